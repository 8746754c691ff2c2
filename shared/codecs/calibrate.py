"""Fit the calibrated stages of a codec spec on a model's features; write a calibration artifact.

    images (folder | synthetic scenes) ──► Tx half (vision encoder) ──► features [T, D] per image
        ──► for each stage, in spec order:
              calibrated?  fit on what reaches it (fields, or serialized bytes for byte stages)
              then run it on every sample, so the next stage fits on its outputs
        ──► CalibrationArtifact(spec, tensors, model fingerprint, creation info)
        ──► NAME.safetensors + NAME.json

`splitvlm calibrate` is the command-line front end.
"""

from __future__ import annotations

import datetime
import getpass
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from shared import __version__
from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.base import ByteStage, CodecContext, Fields, FieldSpec, Stage, TensorStage
from shared.codecs.calibration import CalibratedStage, CalibrationArtifact, needs_calibration, tensor_key
from shared.codecs.pipeline import PRESETS, Codec, build_codec, parse_stage, stage_output_context
from shared.codecs.serialize import pack
from shared.errors import CodecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def parse_stages(spec: str) -> tuple[str, list[Stage]]:
    """(canonical spec, fresh uncalibrated stages) for a preset or spec string."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError("codec spec must be a non-empty string")
    expanded = PRESETS.get(spec.strip(), spec.strip())
    stages = [parse_stage(part) for part in expanded.split("|")]
    return "|".join(s.spec for s in stages), stages


def fit_stages(
    spec: str,
    features: Sequence[torch.Tensor],
    *,
    model: str = "",
    model_fingerprint: str = "",
    extra: dict[str, Any] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> CalibrationArtifact:
    """Fit every calibrated stage of `spec` on `features` (``[T, D]`` each), in order."""
    canonical, stages = parse_stages(spec)
    if not features:
        raise CodecError("calibration needs at least one feature tensor")
    # Check the chain (order, quantizers, fields) before fitting anything.
    Codec(canonical, stages)
    samples: list[Fields] = [{"x": f.detach().float().cpu()} for f in features]
    ctxs = [CodecContext(int(f.shape[0]), int(f.shape[1]), torch.float32) for f in features]
    blobs: list[bytes] | None = None
    tensors: dict[str, torch.Tensor] = {}
    described: list[dict[str, Any]] = []
    for index, stage in enumerate(stages):
        if on_stage is not None:
            on_stage(stage.spec)
        if isinstance(stage, ByteStage) and blobs is None:
            blobs = [_pack_fields(fields) for fields in samples]
        if needs_calibration(stage):
            assert isinstance(stage, CalibratedStage)
            fitted = stage.fit(blobs if isinstance(stage, ByteStage) else samples)
            for name, t in fitted.items():
                tensors[tensor_key(index, stage, name)] = t.detach().cpu().contiguous()
            described.append({"index": index, "name": stage.name, "spec": stage.spec})
        if isinstance(stage, TensorStage):
            new_samples, new_ctxs = [], []
            for fields, ctx in zip(samples, ctxs, strict=True):
                produced = stage.encode({k: fields[k] for k in stage.inputs}, ctx)
                new_samples.append({k: v for k, v in fields.items() if k not in stage.inputs} | produced)
                new_ctxs.append(stage_output_context(stage, ctx))
            samples, ctxs = new_samples, new_ctxs
        elif isinstance(stage, ByteStage):
            assert blobs is not None
            blobs = [stage.encode(b, ctx) for b, ctx in zip(blobs, ctxs, strict=True)]
    if not described:
        raise CodecError(f"codec {canonical!r} has no stage that needs calibration")
    created = {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "splitvlm": __version__,
        "torch": torch.__version__,
        "host": platform.node(),
        "user": _user(),
        "samples": len(features),
        "tokens": int(sum(f.shape[0] for f in features)),
        "dim": int(features[0].shape[1]),
    } | (extra or {})
    return CalibrationArtifact(
        spec=canonical,
        tensors=tensors,
        stages=described,
        model=model,
        model_fingerprint=model_fingerprint,
        created=created,
    )


def _pack_fields(fields: Fields) -> bytes:
    """Serialize fields as the codec does right before its byte stages (the table is self-describing)."""
    return pack(fields, {k: FieldSpec(tuple(v.shape), (v.dtype,)) for k, v in fields.items()})


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""


def collect_features(
    model: str,
    images: Iterable[Any],
    *,
    cache_dir: Path | None = None,
    split_point: Any = None,
    advance: Callable[[], None] | None = None,
) -> tuple[list[torch.Tensor], str]:
    """Run the model's Tx half over PIL `images`; returns (features per image, model fingerprint)."""
    from shared.models.registry import model_fingerprint, resolve_model
    from shared.split import SplitPoint, load_tx_half

    folder = resolve_model(model, cache_dir)
    half = load_tx_half(folder, split_point or SplitPoint.AFTER_VISION_TOWER)
    feats = []
    with torch.inference_mode():
        for image in images:
            feats.append(half.encode(half.preprocess([image])).features.detach().float().cpu())
            if advance is not None:
                advance()
    # Plain tensors (not inference tensors), so stages can train on them with autograd.
    return [f.clone() for f in feats], model_fingerprint(folder, cache_dir)


def synthetic_images(n: int, start: int = 0) -> list[Any]:
    """Images of training scenes (never held-out seeds) start, start+1, ..."""
    from shared.reference.scenes import make_scene, training_seeds

    seeds = training_seeds(start)
    return [make_scene(next(seeds)).image for _ in range(n)]


def folder_images(folder: Path) -> list[Any]:
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CodecError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def calibrate(
    model: str,
    spec: str,
    out: Path,
    *,
    images: Sequence[Any],
    cache_dir: Path | None = None,
    advance: Callable[[], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    source: str = "",
) -> CalibrationArtifact:
    """Collect features of `images` with `model`'s Tx half, fit `spec`, save to `out`, and check it loads."""
    features, fingerprint = collect_features(model, images, cache_dir=cache_dir, advance=advance)
    artifact = fit_stages(
        spec,
        features,
        model=model,
        model_fingerprint=fingerprint,
        extra={"images": source},
        on_stage=on_stage,
    )
    artifact.save(out)
    build_codec(artifact.spec, artifact=CalibrationArtifact.load(out))  # the saved files round-trip
    return artifact


def canonical_spec(spec: str) -> str:
    """The canonical form of a preset or spec (what an artifact records), without building stages' state."""
    return parse_stages(spec)[0]


def load_artifacts(
    paths: Iterable[str | Path], model_fingerprint: str | None = None
) -> dict[str, CalibrationArtifact]:
    """Artifacts by the canonical codec spec they were fitted for; CodecError on two for one spec.

    With `model_fingerprint`, an artifact fitted on another model is refused
    (FingerprintMismatchError): its statistics describe another feature space.
    """
    return dict(ArtifactIndex.discover(model_fingerprint or "", explicit=paths).items())


def build_codec_with(spec: str, artifacts: ArtifactIndex | Mapping[str, CalibrationArtifact]) -> Codec:
    """`build_codec(spec)` with the artifact fitted for this spec, if one is held.

    With an `ArtifactIndex`, a calibrated spec it has no artifact for is refused with the
    index's explanation (what exists instead, and the `splitvlm calibrate` command to run).
    """
    canonical, stages = parse_stages(spec)
    artifact = artifacts.get(canonical)
    if artifact is None and isinstance(artifacts, ArtifactIndex) and any(map(needs_calibration, stages)):
        raise CodecError(artifacts.missing(canonical))
    return build_codec(spec, artifact=artifact)
