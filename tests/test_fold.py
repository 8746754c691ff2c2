"""Compressed-domain decoding: a pca decoder folded into LLaVA's projector linear_1 (shared.codecs.fold)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.codecs import build_codec
from shared.codecs.calibrate import collect_features, fit_stages, synthetic_images
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.fold import FoldCache, flops, fold
from shared.split import GenerationOptions, VisionFeatures

MODEL = "builtin:tiny-llava"
SPEC = "pca:k=16|int8|zstd"
PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def artifact(cache_dir: Path, model_dir: Path) -> CalibrationArtifact:
    features, fingerprint = collect_features(MODEL, synthetic_images(6), cache_dir=cache_dir)
    return fit_stages(SPEC, features, model=MODEL, model_fingerprint=fingerprint)


@pytest.fixture(scope="module")
def halves(model_dir: Path) -> tuple[Any, Any]:
    from shared.split import load_rx_half, load_tx_half

    return load_tx_half(model_dir), load_rx_half(model_dir)


def _both_ways(codec: Any, rx: Any, features: VisionFeatures) -> tuple[VisionFeatures, VisionFeatures]:
    """(decoded features, pre-projected features from the folded decoder) for one payload."""
    payload = codec.encode(features.features)
    shape = tuple(features.features.shape)
    decoded = codec.decode(payload, shape, features.features.dtype)
    z, decoder = codec.decode_compact(payload, shape, features.features.dtype)
    with torch.inference_mode():
        h = fold(decoder, rx.leading_linear())(z)
    return (
        VisionFeatures(features=decoded, meta=features.meta),
        VisionFeatures(features=h, meta=features.meta, pre_projected=True),
    )


def _first_logits(rx: Any, features: VisionFeatures) -> torch.Tensor:
    inputs = rx.build_inputs(PROMPT, features)
    with torch.inference_mode():
        out = rx.model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"])
        return out.logits[0, -1].double()


def test_decode_compact_is_decode_before_its_linear_map(artifact: CalibrationArtifact) -> None:
    codec = build_codec(SPEC, artifact=artifact)
    x = torch.randn(10, artifact.tensors["0.pca.basis"].shape[1])
    payload = codec.encode(x)
    z, (w, b) = codec.decode_compact(payload, tuple(x.shape))
    assert z.shape == (10, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z @ w + b, codec.decode(payload, tuple(x.shape)), rtol=1e-5, atol=1e-5)
    assert build_codec("int8").linear_decoder() is None
    assert build_codec("fp16|zstd:3").linear_decoder() is None


def test_fold_equals_decode_then_linear() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 32, generator=g), torch.randn(32, generator=g)
    lin = torch.nn.Linear(32, 48)
    z = torch.randn(5, 8, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(fold((w, b), lin)(z), lin(z @ w + b), rtol=1e-5, atol=1e-5)
        nobias = torch.nn.Linear(32, 48, bias=False)
        torch.testing.assert_close(fold((w, b), nobias)(z), nobias(z @ w + b), rtol=1e-5, atol=1e-5)
    assert flops(576, 64, 1024, 4096) == (576 * 64 * 1024 + 576 * 1024 * 4096, 576 * 64 * 4096)


def test_folded_logits_match_decode_then_project(
    artifact: CalibrationArtifact, halves: tuple[Any, Any], images: list
) -> None:
    tx, rx = halves
    assert rx.codec_support.fold_linear and rx.leading_linear() is not None
    codec = build_codec(SPEC, artifact=artifact)
    worst = 0.0
    for image in images:
        features = tx.encode(tx.preprocess([image]))
        decoded, folded = _both_ways(codec, rx, features)
        ref, got = _first_logits(rx, decoded), _first_logits(rx, folded)
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    print(f"max relative logits error {worst:.3e}")
    assert worst < 1e-4, worst


def test_greedy_answers_are_identical_on_heldout_scenes(
    artifact: CalibrationArtifact, halves: tuple[Any, Any]
) -> None:
    from shared.reference.evaluate import heldout_items

    tx, rx = halves
    codec = build_codec(SPEC, artifact=artifact)
    options = GenerationOptions(max_new_tokens=6)
    items = heldout_items(n_images=10, per_image=1)
    assert len(items) == 10
    for scene, qa in items:
        decoded, folded = _both_ways(codec, rx, tx.encode(tx.preprocess([scene.image])))
        assert rx.generate(qa.question, folded, options) == rx.generate(qa.question, decoded, options)


def test_pre_projected_features_need_the_projector_width(halves: tuple[Any, Any]) -> None:
    from shared.errors import BadRequestError

    _, rx = halves
    wrong = VisionFeatures(features=torch.zeros(4, rx.feature_dim + 1), pre_projected=True)
    with pytest.raises(BadRequestError, match="feature dim"):
        rx.build_inputs(PROMPT, wrong)


def test_fold_cache_reuses_per_fingerprint(artifact: CalibrationArtifact, halves: tuple[Any, Any]) -> None:
    _, rx = halves
    cache = FoldCache(rx.leading_linear())
    codec = build_codec(SPEC, artifact=artifact)
    assert cache.get(codec) is cache.get(build_codec(SPEC, artifact=artifact))
    assert cache.get(build_codec("int8")) is None


@pytest.mark.parametrize("fold_decoder", [True, False])
def test_rx_engine_reports_which_path_ran(
    fold_decoder: bool,
    artifact: CalibrationArtifact,
    halves: tuple[Any, Any],
    cache_dir: Path,
    tmp_path: Path,
    images: list,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rx_service.engine import RxEngine
    from shared.config import RxSettings
    from shared.protocol.packet import build_header

    path = tmp_path / "pca"
    artifact.save(path)
    monkeypatch.setenv("SPLITVLM_RX_FOLD_DECODER", "1" if fold_decoder else "0")
    settings = RxSettings(cache_dir=cache_dir, codec_artifacts=[path])
    assert settings.fold_decoder is fold_decoder
    engine = RxEngine.load(settings)
    tx, _ = halves
    features = tx.encode(tx.preprocess([images[2]]))
    answers = {}
    for spec in (SPEC, "int8"):
        codec = build_codec(spec, artifact=artifact if spec == SPEC else None)
        payload = codec.encode(features.features)
        header = build_header(
            request_id=uuid.uuid4().hex,
            model_fingerprint=engine.fingerprint,
            split_point=engine.settings.split_point,
            codec_spec=codec.spec,
            codec_fingerprint=codec.fingerprint,
            features=features,
            payload=payload,
        )
        chunks = list(engine.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=4)))
        timings = dict(chunks[-1].timings.ms)
        folded = fold_decoder and spec == SPEC
        assert ("rx_folded_decode" in timings) is folded
        assert ("rx_codec_decode" in timings) is not folded
        answers[spec] = [t for c in chunks for t in c.token_ids]
    assert answers[SPEC]
