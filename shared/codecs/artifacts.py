"""Find calibration artifacts without flags: an index keyed by (model fingerprint, canonical spec).

    explicit paths (--codec-artifact)      ─┐   first match wins, in this order
    <cache_dir>/codecs/*.json  (calibrate)  ├─► ArtifactIndex(model fingerprint)
    <model folder>/codecs/*.json (shipped) ─┘      .get(spec)      → CalibrationArtifact | None
                                                   .missing(spec)  → the error a user can act on

Only each artifact's JSON half is read while indexing (a few hundred bytes); the tensors are
loaded the first time a spec is asked for. An artifact fitted on another model is indexed
too, never used: it only makes the "missing" message say that it exists and what it is for.
Explicit paths are strict: one fitted on another model is an error at start-up, as before.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.codecs.calibration import FORMAT, CalibrationArtifact
from shared.errors import CodecError, FingerprintMismatchError

if TYPE_CHECKING:
    from shared.codecs.ladder import MeasuredLadder

log = logging.getLogger("splitvlm.codecs")

ARTIFACT_DIR = "codecs"  # beside a checkpoint's config.json, and under the splitvlm cache dir


@dataclass(frozen=True)
class ArtifactEntry:
    path: Path  # without suffix: NAME for NAME.safetensors + NAME.json
    spec: str
    model: str
    model_fingerprint: str


def read_entry(path: Path) -> ArtifactEntry | None:
    """The index entry for ``NAME.json`` (None when it is not a calibration artifact)."""
    tensor_path, json_path = CalibrationArtifact.paths(path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not tensor_path.is_file():
        return None
    return ArtifactEntry(
        path=json_path.with_suffix(""),
        spec=str(meta.get("spec", "")),
        model=str(meta.get("model", "")),
        model_fingerprint=str(meta.get("model_fingerprint", "")),
    )


def scan(folder: Path) -> Iterator[ArtifactEntry]:
    if not folder.is_dir():
        return
    for json_path in sorted(folder.glob("*.json")):
        entry = read_entry(json_path)
        if entry is not None:
            yield entry


LADDER_FORMAT_PREFIX = "splitvlm-measured-ladder/"


def find_ladder(folder: Path, model_fingerprint: str) -> Path | None:
    """The first ``*.json`` in `folder` that is a measured ladder for this model."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        try:
            if path.stat().st_size > 1 << 20:
                continue
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and str(meta.get("format", "")).startswith(LADDER_FORMAT_PREFIX)
            and meta.get("model_fingerprint") == model_fingerprint
        ):
            return path
    return None


def default_artifact_name(spec: str, model_fingerprint: str) -> str:
    """A file-name-safe name for `splitvlm calibrate` to write under ``<cache_dir>/codecs``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-")[:80]
    return f"{slug}-{model_fingerprint.removeprefix('sha256:')[:12]}"


@dataclass
class ArtifactIndex:
    """Calibration artifacts usable with one model, by canonical codec spec, loaded on first use."""

    model_fingerprint: str
    model: str = ""
    searched: list[Path] = field(default_factory=list)
    entries: dict[str, ArtifactEntry] = field(default_factory=dict)  # this model's, by spec
    foreign: list[ArtifactEntry] = field(default_factory=list)  # fitted on other models
    ladder_path: Path | None = None  # a measured rate-control ladder for this model, if one was found
    _loaded: dict[str, CalibrationArtifact] = field(default_factory=dict)

    @classmethod
    def discover(
        cls,
        model_fingerprint: str,
        *,
        model: str = "",
        model_folder: Path | None = None,
        cache_dir: Path | None = None,
        explicit: Iterable[str | Path] = (),
    ) -> ArtifactIndex:
        index = cls(model_fingerprint=model_fingerprint, model=model)
        for path in explicit:
            index._add_explicit(Path(path))
        for folder in (cache_dir, model_folder):
            if folder is None:
                continue
            where = Path(folder) / ARTIFACT_DIR
            index.searched.append(where)
            for entry in scan(where):
                index._add(entry)
            if index.ladder_path is None:
                index.ladder_path = find_ladder(where, model_fingerprint)
        return index

    def _add_explicit(self, path: Path) -> None:
        art = CalibrationArtifact.load(path)  # strict: a broken file given by hand is an error
        if (
            self.model_fingerprint
            and art.model_fingerprint
            and art.model_fingerprint != self.model_fingerprint
        ):
            raise FingerprintMismatchError(
                f"calibration artifact {path} was fitted on model {art.model or '?'} "
                f"({art.model_fingerprint}); this service holds {self.model_fingerprint}: "
                "run splitvlm calibrate with this model"
            )
        if art.spec in self._loaded:
            raise CodecError(
                f"two calibration artifacts for codec {art.spec!r}: {self.entries[art.spec].path} and "
                f"{path}; give one per codec spec"
            )
        self.entries[art.spec] = ArtifactEntry(
            CalibrationArtifact.paths(path)[1].with_suffix(""), art.spec, art.model, art.model_fingerprint
        )
        self._loaded[art.spec] = art

    def _add(self, entry: ArtifactEntry) -> None:
        if self.model_fingerprint and entry.model_fingerprint not in ("", self.model_fingerprint):
            self.foreign.append(entry)
        elif entry.spec not in self.entries:  # earlier sources win
            self.entries[entry.spec] = entry

    # ---- lookups ---------------------------------------------------------------------------
    def specs(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, spec: object) -> bool:
        return spec in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs())

    def get(self, spec: str) -> CalibrationArtifact | None:
        """The artifact for canonical `spec`, loaded (and its fingerprint checked) once."""
        art = self._loaded.get(spec)
        if art is None and spec in self.entries:
            art = CalibrationArtifact.load(self.entries[spec].path)
            self._loaded[spec] = art
        return art

    def items(self) -> Iterator[tuple[str, CalibrationArtifact]]:
        for spec in self.specs():
            art = self.get(spec)
            assert art is not None
            yield spec, art

    def ladder(self) -> MeasuredLadder | None:
        """The measured ladder found for this model (`splitvlm calibrate-ladder`), loaded and checked."""
        from shared.codecs.ladder import MeasuredLadder

        if self.ladder_path is None:
            return None
        return MeasuredLadder.load(self.ladder_path, self.model_fingerprint or None)

    def missing(self, spec: str) -> str:
        """Why no artifact serves canonical `spec` here, and the command that makes one."""
        who = self.model or "this model"
        lines = [
            f"codec {spec!r} needs a calibration artifact fitted on {who} "
            f"({self.model_fingerprint[:19]}…) and none was found"
        ]
        same_spec = [e for e in self.foreign if e.spec == spec]
        if same_spec:
            e = same_spec[0]
            lines.append(
                f"{e.path} is for this spec but was fitted on another model "
                f"({e.model or '?'}, {e.model_fingerprint[:19]}…)"
            )
        if self.entries:
            lines.append(f"artifacts for this model exist for other specs: {', '.join(self.specs())}")
        if self.searched:
            lines.append(f"looked in {', '.join(str(p) for p in self.searched)}")
        model_arg = self.model or "MODEL"
        lines.append(
            f"make it with: splitvlm calibrate --model {model_arg} --synthetic 256 --codec '{spec}' "
            "(written under the cache dir, where the services find it)"
        )
        return "; ".join(lines)


def artifacts_for(
    model: str, folder: Path, explicit: Iterable[str | Path] = (), cache_dir: Path | None = None
) -> ArtifactIndex:
    """The index for the checkpoint in `folder` (`model` is how the user named it)."""
    from shared.models.registry import default_cache_dir, model_fingerprint

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return ArtifactIndex.discover(
        model_fingerprint(folder, cache), model=model, model_folder=folder, cache_dir=cache, explicit=explicit
    )


def default_artifact_path(model: str, spec: str, cache_dir: Path | None = None) -> Path:
    """Where `splitvlm calibrate` writes when given no --out: ``<cache_dir>/codecs/<spec>-<model>``."""
    from shared.codecs.calibrate import canonical_spec
    from shared.models.registry import default_cache_dir, model_fingerprint, resolve_model

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = model_fingerprint(resolve_model(model, cache), cache)
    return cache / ARTIFACT_DIR / default_artifact_name(canonical_spec(spec), fingerprint)
