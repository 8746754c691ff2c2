"""Rate control (`shared.codecs.rate`) and the `balanced` / `tiny` presets, on the tiny LLaVA's features."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from shared.codecs import build_codec
from shared.codecs.rate import DEFAULT_LADDER, RateController, RateTarget, mean_token_cosine, usable_ladder
from shared.errors import CodecError, RemoteError
from shared.reference.scenes import make_scene
from shared.split import CodecSupport, SplitPoint, check_codec_support, load_tx_half
from tx_service.client import TxClient

N_SCENES = 20


@pytest.fixture(scope="module")
def scene_features(model_dir: Path) -> list[torch.Tensor]:
    """The tiny LLaVA's vision-tower features ([64, 64] float32) of 20 synthetic scenes."""
    half = load_tx_half(model_dir, SplitPoint.AFTER_VISION_TOWER)
    with torch.inference_mode():
        return [half.encode(half.preprocess([make_scene(seed).image])).features for seed in range(N_SCENES)]


def _no_token_reduction(codec: Any) -> None:
    check_codec_support(codec, CodecSupport(reason="test split"), "TestSplit")


@pytest.mark.parametrize("budget", [16000, 8000, 3000, 1000, 600, 300, 150, 120])
def test_every_payload_fits_the_budget(scene_features: list[torch.Tensor], budget: int) -> None:
    rate = RateController()
    for feats in scene_features:
        choice = rate.choose(feats, RateTarget(budget))
        assert len(choice.payload) <= budget, (choice.spec, len(choice.payload))
        # The payload decodes to the declared shape, and it is the highest-quality candidate that
        # fits: the one before it on the ladder was encoded and did not.
        decoded = choice.codec.decode(choice.payload, choice.shape)
        assert tuple(decoded.shape) == choice.shape == choice.codec.decoded_shape(*feats.shape)
        specs = rate.specs
        index = specs.index(choice.spec)
        if index > 0:
            sizes = dict(choice.tried)
            assert sizes[specs[index - 1]] > budget
        assert len(choice.tried) <= math.ceil(math.log2(len(specs))) + 2  # a binary search
        assert choice.note().startswith(f"target_bytes={budget}: chose {choice.spec!r}")


def test_a_big_budget_is_lossless_and_a_small_one_reduces_tokens(scene_features: list[torch.Tensor]) -> None:
    rate = RateController()
    feats = scene_features[0]
    lossless = rate.choose(feats, RateTarget(1 << 20))
    assert lossless.spec == build_codec("raw|zstd").spec
    assert torch.equal(lossless.codec.decode(lossless.payload, lossless.shape), feats)
    small = rate.choose(feats, RateTarget(300))
    assert small.codec.token_reducers and small.shape[0] < feats.shape[0]


def test_unreachable_budget_is_a_clear_error(scene_features: list[torch.Tensor]) -> None:
    feats = scene_features[0]
    smallest = len(build_codec(DEFAULT_LADDER[-1]).encode(feats))
    with pytest.raises(CodecError, match=rf"no codec fits target_bytes=50; .* is {smallest} B"):
        RateController().choose(feats, RateTarget(50))


def test_without_token_reduction_the_ladder_keeps_every_token(scene_features: list[torch.Tensor]) -> None:
    rate = RateController(usable_ladder(accept=_no_token_reduction))
    assert rate.specs and not any(build_codec(s).token_reducers for s in rate.specs)
    feats = scene_features[0]
    choice = rate.choose(feats, RateTarget(1000))
    assert choice.shape == tuple(feats.shape) and len(choice.payload) <= 1000
    smallest = len(build_codec("linear:bits=2|zstd").encode(feats))
    with pytest.raises(CodecError, match=rf"smallest achievable payload for these features is {smallest} B"):
        rate.choose(feats, RateTarget(300))


def test_fidelity_mode_meets_the_target_with_smaller_payloads_for_lower_targets(
    scene_features: list[torch.Tensor],
) -> None:
    rate = RateController()
    mean_bytes = []
    for fidelity in [0.9999, 0.999, 0.99, 0.95, 0.9]:
        sizes = []
        for feats in scene_features:
            choice = rate.choose(feats, RateTarget(min_fidelity=fidelity))
            decoded = choice.codec.decode(choice.payload, choice.shape)
            measured = mean_token_cosine(feats, decoded)
            assert choice.fidelity == pytest.approx(measured) and measured >= fidelity
            assert not choice.codec.token_reducers  # fidelity mode keeps every token
            # The smallest payload that meets it: the candidate below it on the ladder does not.
            full = [s for s in rate.specs if not build_codec(s).token_reducers]
            index = full.index(choice.spec)
            if index + 1 < len(full):
                below = build_codec(full[index + 1])
                assert mean_token_cosine(feats, below.decode(below.encode(feats), feats.shape)) < fidelity
            sizes.append(len(choice.payload))
        mean_bytes.append(sum(sizes) / len(sizes))
    assert all(a >= b for a, b in itertools.pairwise(mean_bytes)), mean_bytes
    assert mean_bytes[-1] < mean_bytes[0]
    exact = rate.choose(scene_features[0], RateTarget(min_fidelity=1.0))
    assert exact.spec == build_codec("raw|zstd").spec and exact.fidelity == 1.0


def test_fidelity_and_budget_together(scene_features: list[torch.Tensor]) -> None:
    rate = RateController()
    feats = scene_features[0]
    choice = rate.choose(feats, RateTarget(4000, 0.99))
    assert len(choice.payload) <= 4000 and choice.fidelity is not None and choice.fidelity >= 0.99
    with pytest.raises(CodecError, match=r"over target_bytes=1000"):
        rate.choose(feats, RateTarget(1000, 0.9999))


@pytest.mark.parametrize(
    ("max_bytes", "fidelity", "message"),
    [
        (-1, 0.0, "non-negative int"),
        (0, 1.5, r"in \[0, 1\]"),
        (0, float("nan"), "a number"),
        (0, 0.0, "needs target_bytes > 0 or target_fidelity > 0"),
    ],
)
def test_invalid_targets(
    scene_features: list[torch.Tensor], max_bytes: int, fidelity: float, message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        RateController().choose(scene_features[0], RateTarget(max_bytes, fidelity))


# ---- presets ------------------------------------------------------------------------------------


POOLING = {"pool:2|linear:bits=3|zstd": 1 / 16, "pool:4|linear:bits=2|zstd": 1 / 64}  # the old presets


@pytest.mark.parametrize(("preset", "fraction"), POOLING.items())
def test_pooling_specs_meet_their_size_on_tiny_llava(
    scene_features: list[torch.Tensor], preset: str, fraction: float
) -> None:
    codec = build_codec(preset)
    for feats in scene_features:
        fp16_bytes = feats.numel() * 2
        payload = codec.encode(feats)
        assert len(payload) <= fraction * fp16_bytes, (preset, len(payload), fp16_bytes)
        shape = codec.decoded_shape(*feats.shape)
        assert tuple(codec.decode(payload, shape).shape) == shape


@pytest.mark.parametrize("preset", POOLING)
def test_pooling_specs_are_refused_without_token_reduction(preset: str) -> None:
    with pytest.raises(CodecError, match="does not support token reduction"):
        _no_token_reduction(build_codec(preset))


@pytest.mark.parametrize(("preset", "fraction"), [("balanced", 1 / 16), ("tiny", 1 / 64)])
def test_presets_meet_their_size_on_the_reference_model(preset: str, fraction: float) -> None:
    """`balanced` / `tiny` keep every position (salient tokens + calibrated fill): every split
    takes them, and the reference model ships their artifacts, found without flags."""
    from shared.codecs.artifacts import artifacts_for
    from shared.codecs.calibrate import build_codec_with
    from shared.models.registry import resolve_model
    from shared.split import load_tx_half

    folder = resolve_model("builtin:reference-llava")
    codec = build_codec_with(preset, artifacts_for("builtin:reference-llava", folder))
    assert not codec.token_reducers
    _no_token_reduction(codec)  # accepted by a split without token reduction
    half = load_tx_half(folder)
    for seed in (10_000_000, 10_000_001, 10_000_002):
        feats = half.encode(half.preprocess([make_scene(seed).image])).features
        payload = codec.encode(feats)
        assert len(payload) <= fraction * feats.numel() * 2, (preset, len(payload))
        assert codec.decode(payload, tuple(feats.shape)).shape == feats.shape


def test_presets_without_an_artifact_name_the_calibrate_command(tmp_path: Any) -> None:
    from shared.codecs.artifacts import ArtifactIndex
    from shared.codecs.calibrate import build_codec_with

    with pytest.raises(CodecError, match="splitvlm calibrate --model m --synthetic 256"):
        build_codec_with("balanced", ArtifactIndex("sha256:" + "0" * 64, model="m"))


# ---- end to end over loopback gRPC --------------------------------------------------------------


def test_target_bytes_end_to_end(tx: Any) -> None:
    image = make_scene(1000).image  # not an image other tests send: keep the Tx packet cache apart
    with TxClient(tx.address) as client:
        answer = client.ask(image, "What is in the image?", target_bytes=1000, max_new_tokens=4)
        again = client.ask(image, "What color is it?", target_bytes=1000, max_new_tokens=4)
        fixed = client.ask(image, "What is in the image?", codec="lossless", max_new_tokens=2)
    assert answer.token_ids and answer.text
    assert 0 < answer.payload_bytes <= 1000
    assert answer.codec_spec in tx.engine.rate_controller().specs
    assert answer.rate_control.startswith(f"target_bytes=1000: chose {answer.codec_spec!r}")
    assert "tx_rate_control" in answer.timings_ms
    # The packet cache keys on the target: a repeat hits, another codec for the same image does not.
    assert again.cache_hit and again.codec_spec == answer.codec_spec and "cached" in again.rate_control
    assert not fixed.cache_hit and not fixed.rate_control and fixed.payload_bytes > 1000


def test_target_fidelity_end_to_end(tx: Any) -> None:
    image = make_scene(1001).image
    with TxClient(tx.address) as client:
        answer = client.ask(image, "What is in the image?", target_fidelity=0.99, max_new_tokens=2)
    assert answer.token_ids and "target_fidelity=0.99" in answer.rate_control
    half = tx.engine.half
    feats = half.encode(half.preprocess([image])).features
    codec = build_codec(answer.codec_spec)
    assert mean_token_cosine(feats, codec.decode(codec.encode(feats), feats.shape)) >= 0.99


def test_target_with_codec_or_out_of_reach_is_invalid_argument(tx: Any) -> None:
    image = make_scene(1002).image
    with TxClient(tx.address) as client:
        with pytest.raises(RemoteError) as info:
            client.ask(image, "What is in the image?", codec="int8", target_bytes=1000)
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in info.value.detail
        with pytest.raises(RemoteError) as info:
            client.ask(image, "What is in the image?", target_bytes=10)
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        assert "smallest achievable payload" in info.value.detail
        with pytest.raises(RemoteError) as info:
            client.ask(image, "What is in the image?", target_fidelity=1.5)
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
