"""Calibration artifacts: the fitted state of calibrated codec stages, on disk and in the fingerprint.

    splitvlm calibrate ──fit stages in order──► CalibrationArtifact
        ├── NAME.safetensors   tensors, keyed "<stage index>.<stage name>.<tensor>"
        └── NAME.json          {"format", "spec", "stages": [{index, name, spec}],
                                "model_fingerprint", "model", "created": {...}}

    artifact fingerprint = "sha256:" + sha256( canonical JSON
                                               + for each tensor, sorted by name:
                                                 name, dtype, shape, raw little-endian bytes )

    build_codec(spec, artifact=A) ──► each calibrated stage loads its tensors from A
                                  ──► stage.artifact_digest() = A.fingerprint
                                  ──► Codec.fingerprint = sha256(spec + digests)

So a Tx and an Rx holding different artifacts for the same spec compute
different codec fingerprints, and the Rx refuses the packet
(FAILED_PRECONDITION, naming both). The fingerprint is computed over a
canonical form of both files (sorted-key JSON, tensors in name order with dtype
and shape), not over file bytes, so it does not depend on how a writer orders
the safetensors header.

An artifact is fitted for one canonical codec spec: later stages are fitted on
the outputs of earlier ones, so it cannot be reused with another pipeline.
"""

from __future__ import annotations

import hashlib
import json
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from shared.codecs.base import Stage, dtype_name
from shared.errors import CodecError

FORMAT = "splitvlm-codec-calibration/1"
# Tensors an artifact may hold, in total; loading refuses anything larger.
MAX_ARTIFACT_BYTES = 1 << 30


class CalibratedStage:
    """Mixin for stages whose state is fitted on calibration data and stored in an artifact.

    Subclasses implement `fit` (samples -> tensors) and `_load` (tensors -> ready
    to run, validating every tensor's shape and dtype against the parameters).
    """

    name: ClassVar[str]
    # What `fit` consumes: "fields" (the pipeline's fields before this stage) or "bytes".
    fits_on: ClassVar[str] = "fields"

    _digest: str | None = None
    _loaded: bool = False

    def needs_calibration(self) -> bool:
        return True

    def fit(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Fit on calibration samples; return the tensors to store (and load them)."""
        raise NotImplementedError

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def load_state(self, tensors: Mapping[str, torch.Tensor], digest: str | None) -> None:
        self._load(tensors)
        self._digest = digest
        self._loaded = True

    def artifact_digest(self) -> str | None:
        return self._digest

    def require_calibrated(self) -> None:
        if self.needs_calibration() and not self._loaded:
            raise CodecError(
                f"{self.name} needs calibration: run splitvlm calibrate --model M --synthetic N "
                f"--codec SPEC --out ARTIFACT, then pass the artifact (--codec-artifact / "
                f"build_codec(spec, artifact=...))"
            )


def needs_calibration(stage: Stage) -> bool:
    return isinstance(stage, CalibratedStage) and stage.needs_calibration()


def tensor_key(index: int, stage: Stage, name: str) -> str:
    return f"{index}.{stage.name}.{name}"


def _check_tensor(stage: str, key: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise CodecError(
            f"calibration artifact for {stage!r}: tensor {key!r} is {dtype_name(t.dtype)} "
            f"{tuple(t.shape)}, expected {dtype_name(dtype)} {shape}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CodecError(f"calibration artifact for {stage!r}: tensor {key!r} holds NaN or Inf")


def get_tensor(
    stage: str,
    tensors: Mapping[str, torch.Tensor],
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Tensor `key`, checked against the shape and dtype the stage's parameters imply."""
    if key not in tensors:
        raise CodecError(f"calibration artifact for {stage!r} lacks tensor {key!r}")
    t = tensors[key]
    _check_tensor(stage, key, t, shape, dtype)
    return t.contiguous()


@dataclass
class CalibrationArtifact:
    """Fitted tensors for every calibrated stage of one codec spec, plus where they came from."""

    spec: str
    tensors: dict[str, torch.Tensor]
    stages: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    model_fingerprint: str = ""
    created: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "spec": self.spec,
            "stages": self.stages,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "created": self.created,
        }

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.meta(), sort_keys=True, separators=(",", ":")).encode())
        for key in sorted(self.tensors):
            t = self.tensors[key].detach().cpu().contiguous()
            h.update(struct.pack("<I", len(key)) + key.encode())
            h.update(dtype_name(t.dtype).encode() + b"|" + ",".join(map(str, t.shape)).encode() + b"|")
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def stage_tensors(self, index: int, stage: Stage) -> dict[str, torch.Tensor]:
        prefix = f"{index}.{stage.name}."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    # ---- files -------------------------------------------------------------
    @staticmethod
    def paths(path: str | Path) -> tuple[Path, Path]:
        """(NAME.safetensors, NAME.json) for `path` given with or without either suffix."""
        p = Path(path)
        if p.suffix in (".safetensors", ".json"):
            p = p.with_suffix("")
        return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")

    def save(self, path: str | Path) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        tensor_path, json_path = self.paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}, str(tensor_path))
        meta = self.meta() | {"fingerprint": self.fingerprint}
        json_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        # safetensors writes through a private temporary file (mode 0600); give the tensors the
        # mode every other new file gets (the umask's, as the .json has), so both travel alike.
        tensor_path.chmod(stat.S_IMODE(json_path.stat().st_mode))
        return tensor_path, json_path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationArtifact:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensor_path, json_path = cls.paths(path)
        for p in (tensor_path, json_path):
            if not p.is_file():
                raise CodecError(f"calibration artifact file {p} does not exist")
        if tensor_path.stat().st_size > MAX_ARTIFACT_BYTES:
            raise CodecError(f"calibration artifact {tensor_path} is larger than {MAX_ARTIFACT_BYTES} bytes")
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            raise CodecError(f"calibration artifact {json_path} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CodecError(f"calibration artifact {json_path}: format is not {FORMAT!r}")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CodecError(f"calibration artifact {tensor_path} does not load ({e})") from None
        art = cls(
            spec=str(meta.get("spec", "")),
            tensors=dict(tensors),
            stages=list(meta.get("stages", [])),
            model=str(meta.get("model", "")),
            model_fingerprint=str(meta.get("model_fingerprint", "")),
            created=dict(meta.get("created", {})),
        )
        recorded = meta.get("fingerprint")
        if recorded is not None and recorded != art.fingerprint:
            raise CodecError(
                f"calibration artifact {path}: recorded fingerprint {recorded} does not match its "
                f"contents ({art.fingerprint}); the files were edited or mixed up"
            )
        return art


ArtifactLike = CalibrationArtifact | str | Path


def as_artifact(artifact: ArtifactLike) -> CalibrationArtifact:
    return artifact if isinstance(artifact, CalibrationArtifact) else CalibrationArtifact.load(artifact)


def attach_artifact(spec: str, stages: Sequence[Stage], artifact: ArtifactLike | None) -> None:
    """Load every calibrated stage's state from `artifact`; CodecError if one is missing or mismatched."""
    calibrated = [(i, s) for i, s in enumerate(stages) if needs_calibration(s)]
    if artifact is None:
        for _, stage in calibrated:
            assert isinstance(stage, CalibratedStage)
            stage.require_calibrated()
        return
    art = as_artifact(artifact)
    if art.spec != spec:
        raise CodecError(
            f"calibration artifact was fitted for codec {art.spec!r}, not {spec!r}; "
            "run splitvlm calibrate for this spec"
        )
    if not calibrated:
        return
    digest = art.fingerprint
    for index, stage in calibrated:
        assert isinstance(stage, CalibratedStage)
        stage.load_state(art.stage_tensors(index, stage), digest)
