"""Measured rate-control ladders: candidate codecs with the payload and accuracy measured on a model.

    candidate specs ──evaluate_split on N held-out scenes (shared.reference.evaluate)──►
        Rung(spec, mean / max payload B, held-out accuracy, artifact fingerprint) per spec
    ──► MeasuredLadder(model fingerprint, split, rungs) ──► LADDER.json

    RateController(measured=ladder, artifacts=...)   (shared.codecs.rate)
        candidates: most accurate first (ties: larger mean payload, i.e. higher fidelity, first)
        target_bytes=N: encode in that order, take the first whose real payload is <= N

The default ladder is ordered by nominal size, which assumes accuracy falls with
size; on a trained model it does not always (token pooling can cost more accuracy
than 2-bit codes at several times its size). A measured ladder replaces the
assumption with numbers for one model: it is keyed by the model's fingerprint and
refused for another model. Payloads are still measured per image by encoding, so
a chosen payload always fits; the stored sizes only order fidelity-mode scans.

Calibrated specs (``salient``, ``pca``, ...) are measured with their artifact,
whose fingerprint the rung records; at use, a rung whose artifact is not held (or
differs) is left out, since its accuracy describes other fitted state. The
accuracies come from validation scenes (seeds from 9,000,000), which neither training
nor `splitvlm eval` uses. A ladder file in a checkpoint's (or the cache dir's) codecs/
folder is found without flags (`shared.codecs.artifacts.ArtifactIndex.ladder`).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.calibrate import build_codec_with, canonical_spec
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.pipeline import Codec
from shared.errors import CodecError, FingerprintMismatchError

FORMAT = "splitvlm-measured-ladder/1"
# A ladder file is a few hundred bytes per rung; anything far larger is not one.
MAX_LADDER_FILE_BYTES = 1 << 20
MAX_RUNGS = 256

# Where calibrated rungs find their fitted state: an index or {canonical spec: artifact}.
Artifacts = ArtifactIndex | Mapping[str, CalibrationArtifact]


@dataclass(frozen=True)
class Rung:
    """One candidate codec and what it measured on the held-out scenes."""

    spec: str  # canonical codec spec
    accuracy: float  # exact-match accuracy on `questions` held-out questions
    mean_bytes: float  # mean payload per image
    max_bytes: int
    questions: int
    artifact: str = ""  # fingerprint of the calibration artifact measured with ("" when none)

    @classmethod
    def from_dict(cls, raw: object, where: str) -> Rung:
        keys = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) - keys:
            raise CodecError(f"{where}: a rung must be an object with (only) the keys {sorted(keys)}")
        spec, artifact = raw.get("spec"), raw.get("artifact", "")
        if not isinstance(spec, str) or not isinstance(artifact, str):
            raise CodecError(f"{where}: 'spec' and 'artifact' must be strings")
        accuracy = _number(raw.get("accuracy"), 1.0)
        if accuracy is None:
            raise CodecError(f"{where}: 'accuracy' must be a number in [0, 1], got {raw.get('accuracy')!r}")
        mean_bytes = _number(raw.get("mean_bytes"), math.inf)
        if mean_bytes is None:
            raise CodecError(
                f"{where}: 'mean_bytes' must be a non-negative number, got {raw.get('mean_bytes')!r}"
            )
        counts = []
        for name in ("max_bytes", "questions"):
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CodecError(f"{where}: {name!r} must be a non-negative int, got {value!r}")
            counts.append(value)
        try:
            canonical = canonical_spec(spec)
        except CodecError as e:
            raise CodecError(f"{where}: {e}") from None
        return cls(canonical, accuracy, mean_bytes, counts[0], counts[1], artifact)


def _number(value: object, hi: float) -> float | None:
    """`value` as a float when it is a finite number in [0, hi], else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if 0.0 <= value <= hi else None


def artifact_digests(codec: Codec) -> str:
    """The calibration artifact fingerprint(s) `codec` was built with, "" for a calibration-free one."""
    return ",".join(sorted({d for s in codec.stages if (d := s.artifact_digest()) is not None}))


@dataclass
class MeasuredLadder:
    """Rungs measured on one model; `ordered()` is the order rate control tries them in."""

    rungs: list[Rung]
    model: str = ""
    model_fingerprint: str = ""
    split: str = ""
    heldout_images: int = 0
    created: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rungs:
            raise CodecError("a measured ladder needs at least one rung")
        if len(self.rungs) > MAX_RUNGS:
            raise CodecError(f"a measured ladder holds at most {MAX_RUNGS} rungs, got {len(self.rungs)}")
        specs = [r.spec for r in self.rungs]
        duplicates = sorted({s for s in specs if specs.count(s) > 1})
        if duplicates:
            raise CodecError(f"a measured ladder lists codec(s) twice: {', '.join(duplicates)}")

    def ordered(self) -> list[Rung]:
        """Most accurate first; equal accuracy: the larger mean payload (the higher fidelity) first,
        so a generous budget is spent on fidelity rather than on the smallest tied codec."""
        return sorted(self.rungs, key=lambda r: (-r.accuracy, -r.mean_bytes, r.spec))

    def codecs(
        self,
        artifacts: Artifacts | None = None,
        accept: Callable[[Codec], None] | None = None,
    ) -> tuple[list[tuple[Codec, Rung]], list[str]]:
        """(codec, rung) pairs in `ordered()` order, and why each left-out rung was left out.

        Left out: calibrated specs without their measured artifact among `artifacts`, codecs
        that need the Tx half's token scores, and codecs `accept` refuses (raises CodecError).
        """
        usable: list[tuple[Codec, Rung]] = []
        skipped: list[str] = []
        for rung in self.ordered():
            try:
                codec = build_codec_with(rung.spec, artifacts if artifacts is not None else {})
            except CodecError as e:
                skipped.append(f"{rung.spec}: {e}")
                continue
            if artifact_digests(codec) != rung.artifact:
                skipped.append(f"{rung.spec}: measured with calibration artifact {rung.artifact or 'none'}")
                continue
            if codec.score_kind:
                skipped.append(f"{rung.spec}: needs the Tx half's {codec.score_kind!r} scores")
                continue
            if accept is not None:
                try:
                    accept(codec)
                except CodecError as e:
                    skipped.append(f"{rung.spec}: {e}")
                    continue
            usable.append((codec, rung))
        if not usable:
            raise CodecError("rate control: no rung of the measured ladder is usable: " + "; ".join(skipped))
        return usable, skipped

    # ---- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "split": self.split,
            "heldout_images": self.heldout_images,
            "created": self.created,
            "rungs": [asdict(r) for r in self.ordered()],
        }

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, model_fingerprint: str | None = None) -> MeasuredLadder:
        """Read and check a ladder file; with `model_fingerprint`, refuse one measured on another model."""
        p = Path(path)
        if not p.is_file():
            raise CodecError(f"measured ladder {p} does not exist")
        if p.stat().st_size > MAX_LADDER_FILE_BYTES:
            raise CodecError(f"measured ladder {p} is larger than {MAX_LADDER_FILE_BYTES} bytes")
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise CodecError(f"measured ladder {p} is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CodecError(f"measured ladder {p}: format is not {FORMAT!r}")
        rungs = raw.get("rungs")
        if not isinstance(rungs, list) or len(rungs) > MAX_RUNGS:
            raise CodecError(f"measured ladder {p}: 'rungs' must be a list of at most {MAX_RUNGS}")
        created = raw.get("created", {})
        images = raw.get("heldout_images", 0)
        ladder = cls(
            rungs=[Rung.from_dict(r, f"measured ladder {p}, rung {i}") for i, r in enumerate(rungs)],
            model=str(raw.get("model", "")),
            model_fingerprint=str(raw.get("model_fingerprint", "")),
            split=str(raw.get("split", "")),
            heldout_images=images if isinstance(images, int) and not isinstance(images, bool) else 0,
            created=created if isinstance(created, dict) else {},
        )
        if model_fingerprint and ladder.model_fingerprint != model_fingerprint:
            raise FingerprintMismatchError(
                f"measured ladder {p} was measured on model {ladder.model or '?'} "
                f"({ladder.model_fingerprint or 'no fingerprint'}); this model is {model_fingerprint}: "
                "run splitvlm calibrate-ladder with this model"
            )
        return ladder


def measure_ladder(
    folder: Path,
    specs: Sequence[str],
    *,
    images: int,
    artifacts: Artifacts | None = None,
    split_point: Any = None,
    model: str = "",
    model_fingerprint: str = "",
    progress: Any = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> MeasuredLadder:
    """Evaluate each spec split on `images` validation scenes (2 questions each); one rung per spec.

    Validation scenes (`shared.reference.scenes.VALIDATION_START`) are neither trained on nor
    scored by `splitvlm eval`, so rate control is never tuned on the scenes it is scored on.

    A spec the split refuses (e.g. a token reducer on a family without token reduction) or
    that lacks its calibration artifact is skipped and reported through `on_skip(spec, why)`.
    """
    from shared.reference.evaluate import evaluate_split, validation_items
    from shared.split import SplitPoint

    split = split_point or SplitPoint.AFTER_VISION_TOWER
    items = validation_items(images)
    held: Artifacts = artifacts if artifacts is not None else {}
    rungs: list[Rung] = []
    seen: set[str] = set()
    for spec in specs:
        try:
            codec = build_codec_with(spec, held)
            if codec.spec in seen:
                continue
            result = evaluate_split(folder, items, spec, split, progress, artifacts=held)
        except CodecError as e:
            if on_skip is not None:
                on_skip(spec, str(e))
            continue
        seen.add(codec.spec)
        rungs.append(
            Rung(
                spec=codec.spec,
                accuracy=result.accuracy,
                mean_bytes=result.mean_payload_bytes,
                max_bytes=max(result.payload_bytes, default=0),
                questions=len(result.expected),
                artifact=artifact_digests(codec),
            )
        )
    if not rungs:
        raise CodecError("no candidate codec could be measured (all were skipped)")
    return MeasuredLadder(
        rungs=rungs,
        model=model,
        model_fingerprint=model_fingerprint,
        split=str(getattr(split, "value", split)),
        heldout_images=images,
        created={"at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
    )
