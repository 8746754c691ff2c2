"""The ``salient`` stage (K most salient tokens + positions; calibrated fill elsewhere) and
``linear:...,scale=fp16``: shapes, exactness, calibration, hostile payloads, tiny LLaVA features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codecs import Codec, CodecContext, build_codec
from shared.codecs.base import FieldSpec
from shared.codecs.calibrate import fit_stages
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.salient import Salient, index_dtype, uses_bitmap
from shared.codecs.serialize import pack
from shared.errors import CodecError, PacketTooLargeError
from shared.reference.scenes import make_scene
from shared.split import CodecSupport, SplitPoint, check_codec_support, load_tx_half

REJECTED = (CodecError, PacketTooLargeError)
TOKENS, DIM = 60, 16  # 60 tokens: the bitmap has 4 padding bits


def _features(n: int, tokens: int = TOKENS, dim: int = DIM, seed: int = 0) -> list[torch.Tensor]:
    """A shared background plus a few strong tokens per image (in a common 4-dim subspace), as a
    scene's features look: objects over a background."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(7)
    background, objects = torch.randn(dim, generator=fixed), torch.randn(4, dim, generator=fixed)
    out = []
    for _ in range(n):
        x = background + 0.1 * torch.randn(tokens, dim, generator=g)
        strong = torch.randperm(tokens, generator=g)[: max(1, tokens // 6)]
        x[strong] += 3 * torch.randn(len(strong), 4, generator=g) @ objects
        out.append(x)
    return out


TRAIN = _features(12)
TEST = _features(3, seed=5)
_ARTIFACTS: dict[str, CalibrationArtifact] = {}


def _codec(spec: str, train: list[torch.Tensor] | None = None) -> Codec:
    if train is not None:
        return build_codec(spec, artifact=fit_stages(spec, train))
    if spec not in _ARTIFACTS:
        _ARTIFACTS[spec] = fit_stages(spec, TRAIN)
    return build_codec(spec, artifact=_ARTIFACTS[spec])


def _salient(codec: Codec) -> Salient:
    stage = codec.stages[0]
    assert isinstance(stage, Salient)
    return stage


def _median_distance(x: torch.Tensor) -> torch.Tensor:
    return (x - x.median(dim=0).values).norm(dim=1)


# ---- shapes and exactness ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "salient:k=8|raw",
        "salient:k=8|zstd",
        "salient:keep=0.25|fp16|zstd",
        "salient:k=12|int8|zstd",
        "salient:k=12,score=norm|linear:bits=4,scale=fp16|zstd",
        "salient:k=12|pca:k=8|linear:bits=4|zstd",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_every_position(spec: str, dtype: torch.dtype) -> None:
    codec = _codec(spec)
    assert codec.token_reducers == () and codec.decoded_shape(TOKENS, DIM) == (TOKENS, DIM)
    x = TEST[0].to(dtype)
    y = codec.decode(codec.encode(x), x.shape, dtype)
    assert y.shape == x.shape and y.dtype == dtype and bool(torch.isfinite(y).all())


def test_kept_tokens_are_exact_and_the_rest_is_the_fill() -> None:
    codec = _codec("salient:k=10|raw|zstd")
    stage = _salient(codec)
    for x in TEST:
        y = codec.decode(codec.encode(x), x.shape)
        kept = stage.keep_indices(x)
        assert kept.tolist() == sorted(kept.tolist()) and len(kept) == 10
        # The K tokens farthest from the median token, ranked independently here.
        distance = _median_distance(x)
        dropped = torch.ones(TOKENS, dtype=torch.bool)
        dropped[kept] = False
        assert float(distance[kept].min()) >= float(distance[dropped].max())
        assert torch.equal(y[kept], x[kept])
        assert torch.equal(y[dropped], stage.fill.expand(int(dropped.sum()), DIM))


def test_the_fill_is_the_mean_of_the_calibration_features_non_salient_tokens() -> None:
    artifact = fit_stages("salient:k=10|raw", TRAIN)
    stage = Salient(k=10)
    rest = []
    for x in TRAIN:
        dropped = torch.ones(TOKENS, dtype=torch.bool)
        dropped[stage.keep_indices(x)] = False
        rest.append(x[dropped])
    expected = torch.cat(rest).double().mean(0).float()
    torch.testing.assert_close(artifact.tensors["0.salient.fill"], expected, rtol=1e-6, atol=1e-6)
    assert artifact.tensors["0.salient.fill"].dtype == torch.float32


def test_score_norm_and_keep_fraction() -> None:
    x = TEST[1]
    assert Salient(keep=0.25).kept_tokens(TOKENS) == 15 and Salient(k=500).kept_tokens(TOKENS) == TOKENS
    kept = Salient(k=5, score="norm").keep_indices(x)
    assert set(kept.tolist()) == set(torch.topk(x.norm(dim=1), 5).indices.tolist())
    # Every token kept: lossless under raw, whatever the fill.
    codec = _codec("salient:k=500|raw")
    assert torch.equal(codec.decode(codec.encode(x), x.shape), x)


def test_score_cls_uses_the_tx_scores_and_must_come_first() -> None:
    stage = Salient(k=3, score="cls")
    stage.load_state({"fill": torch.zeros(DIM)}, None)
    from shared.codecs.raw import Raw

    codec = Codec("cls", [stage, Raw()])
    assert codec.score_kind == "cls"
    x = TEST[0]
    scores = torch.zeros(TOKENS)
    scores[[4, 40, 17]] = torch.tensor([1.0, 3.0, 2.0])
    y = codec.decode(codec.encode(x, scores=scores), x.shape)
    assert torch.equal(y[[4, 17, 40]], x[[4, 17, 40]]) and int((y.abs().sum(1) > 0).sum()) == 3
    with pytest.raises(CodecError, match="must provide"):
        codec.encode(x)
    with pytest.raises(CodecError, match="60 finite values"):
        codec.encode(x, scores=scores[:5])
    with pytest.raises(CodecError, match="must be the first stage"):
        fit_stages("fp16|salient:k=3,score=cls", TRAIN)  # the order is checked before fitting
    with pytest.raises(CodecError, match="cannot be calibrated"):
        fit_stages("salient:k=3,score=cls|raw", TRAIN)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("salient", "exactly one of a token count"),
        ("salient:k=3,keep=0.5", "exactly one of a token count"),
        ("salient:k=3,score=entropy", "score must be one of median, norm, cls"),
        ("salient:k=3|int8", "needs calibration"),
    ],
)
def test_bad_specs_are_refused(spec: str, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        build_codec(spec)
    with pytest.raises(CodecError, match="needs field"):
        fit_stages("int8|salient:k=3", TRAIN)  # salient works on float features


def test_canonical_spec() -> None:
    assert _codec("salient:k=8|raw").spec == "salient:k=8,keep=0.0,score=median|raw"


# ---- positions -----------------------------------------------------------------------------------


def test_positions_travel_as_whichever_is_smaller() -> None:
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(40_000) == torch.int32
    # T = 256 (the reference model): indices below K = 32, then the 32-byte bitmap.
    assert not uses_bitmap(256, 16) and not uses_bitmap(256, 31) and uses_bitmap(256, 32)
    assert uses_bitmap(576, 36) and not uses_bitmap(576, 35)  # 72-byte bitmap vs 2-byte indices
    stage = Salient(k=8)
    stage.load_state({"fill": torch.zeros(DIM)}, None)
    bitmap = stage.layout({"x": _x_spec(TOKENS)}, CodecContext(TOKENS, DIM, torch.float32))["pos"]
    assert bitmap.shape == (8,) and bitmap.dtypes == (torch.uint8,)
    few = Salient(k=3)
    few.load_state({"fill": torch.zeros(DIM)}, None)
    indices = few.layout({"x": _x_spec(TOKENS)}, CodecContext(TOKENS, DIM, torch.float32))["pos"]
    assert indices.shape == (3,) and indices.dtypes == (torch.uint8,)


def _x_spec(tokens: int) -> FieldSpec:
    return FieldSpec((tokens, DIM), (torch.float32,))


@pytest.mark.parametrize(("tokens", "k"), [(300, 5), (300, 100), (60, 3), (60, 30), (8, 8), (1, 1)])
def test_round_trip_with_indices_and_bitmaps(tokens: int, k: int) -> None:
    train = _features(4, tokens=tokens)
    codec = _codec(f"salient:k={k}|raw", train)
    x = _features(1, tokens=tokens, seed=9)[0]
    y = codec.decode(codec.encode(x), x.shape)
    kept = _salient(codec).keep_indices(x)
    assert torch.equal(y[kept], x[kept])


# ---- hostile payloads ----------------------------------------------------------------------------


def _payload(codec: Codec, x: torch.Tensor, pos: torch.Tensor) -> bytes:
    """A payload whose kept tokens are x's first rows and whose positions field is `pos`."""
    ctx = CodecContext(int(x.shape[0]), int(x.shape[1]), x.dtype)
    layout = codec.layout(ctx)
    keep = layout["x"].shape[0]
    return pack({"x": x[:keep].contiguous(), "pos": pos}, layout)


def test_corrupt_bitmaps_are_refused() -> None:
    codec = _codec("salient:k=10|raw")
    x = TEST[0]
    good = np.zeros(TOKENS, dtype=np.uint8)
    good[:10] = 1
    packed = np.packbits(good, bitorder="little")
    y = codec.decode(_payload(codec, x, torch.from_numpy(packed.copy())), x.shape)
    assert torch.equal(y[:10], x[:10])
    one_more = packed.copy()
    one_more[5] |= 1
    with pytest.raises(CodecError, match="marks 11 tokens, expected 10"):
        codec.decode(_payload(codec, x, torch.from_numpy(one_more)), x.shape)
    one_less = packed.copy()
    one_less[0] &= 0xFE
    with pytest.raises(CodecError, match="marks 9 tokens"):
        codec.decode(_payload(codec, x, torch.from_numpy(one_less)), x.shape)
    padding = packed.copy()
    padding[0] &= 0xFE  # move one mark into the padding (bits 60..63): still 10 set bits
    padding[-1] |= 0x80
    with pytest.raises(CodecError, match="past the last token"):
        codec.decode(_payload(codec, x, torch.from_numpy(padding)), x.shape)


@pytest.mark.parametrize(
    ("pos", "match"),
    [([0, 1, 60], r"lie in \[0, 60\)"), ([3, 3, 4], "strictly ascending"), ([9, 2, 4], "strictly ascending")],
)
def test_corrupt_indices_are_refused(pos: list[int], match: str) -> None:
    codec = _codec("salient:k=3|raw")
    x = TEST[0]
    with pytest.raises(CodecError, match=match):
        codec.decode(_payload(codec, x, torch.tensor(pos, dtype=torch.uint8)), x.shape)


@pytest.mark.parametrize("spec", ["salient:k=10|zstd", "salient:k=3|pca:k=8|linear:bits=4|zstd"])
def test_truncated_or_padded_payloads_never_decode(spec: str) -> None:
    codec = _codec(spec)
    x = TEST[2]
    payload = codec.encode(x)
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(REJECTED):
            codec.decode(payload[:cut], x.shape)
    with pytest.raises(REJECTED):
        codec.decode(payload + b"\0", x.shape)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(1, 300))
def test_random_bytes_are_refused_cleanly(data: bytes, tokens: int) -> None:
    codec = _codec("salient:k=10|raw")
    try:
        y = codec.decode(data, (tokens, DIM))
    except REJECTED:
        return
    assert y.shape == (tokens, DIM)


def test_declared_shapes_bound_the_work() -> None:
    codec = _codec("salient:k=10|raw")
    with pytest.raises(PacketTooLargeError):
        codec.decode(b"\0" * 64, (1 << 24, DIM), max_decoded_bytes=1 << 20)
    with pytest.raises(CodecError, match="calibrated on 16-dim features"):
        codec.decode(b"\0" * 64, (TOKENS, 32))
    with pytest.raises(CodecError, match="calibrated on 16-dim features"):
        codec.encode(torch.randn(TOKENS, 32))


# ---- calibration and composition -----------------------------------------------------------------


def test_later_stages_are_fitted_on_the_salient_tokens() -> None:
    spec = "salient:k=10|pca:k=8|linear:bits=4|zstd"
    artifact = fit_stages(spec, TRAIN)
    assert [s["name"] for s in artifact.stages] == ["salient", "pca"]
    assert set(artifact.tensors) == {"0.salient.fill", "1.pca.mean", "1.pca.basis"}
    stage = Salient(k=10)
    salient_tokens = torch.cat([x[stage.keep_indices(x)] for x in TRAIN])
    torch.testing.assert_close(
        artifact.tensors["1.pca.mean"], salient_tokens.double().mean(0).float(), rtol=1e-5, atol=1e-5
    )
    assert artifact.tensors["1.pca.basis"].shape == (8, DIM)
    codec = build_codec(spec, artifact=artifact)
    x = TEST[0]
    y = codec.decode(codec.encode(x), x.shape)
    kept = stage.keep_indices(x)
    cos = torch.nn.functional.cosine_similarity(y[kept], x[kept], dim=-1)
    assert float(cos.mean()) > 0.95
    assert codec.linear_decoder() is None  # the fill is not a linear map of the code: no folding


def test_artifact_round_trip_and_fingerprint(tmp_path: Path) -> None:
    spec = "salient:k=10|pca:k=8|int8|zstd"
    a = fit_stages(spec, TRAIN)
    b = fit_stages(spec, _features(12, seed=3))
    fa, fb = build_codec(spec, artifact=a).fingerprint, build_codec(spec, artifact=b).fingerprint
    assert fa != fb
    a.save(tmp_path / "sal")
    loaded = build_codec(spec, artifact=tmp_path / "sal")
    assert loaded.fingerprint == fa
    x = TEST[1]
    original = build_codec(spec, artifact=a)
    assert torch.equal(
        loaded.decode(original.encode(x), x.shape), original.decode(original.encode(x), x.shape)
    )
    bad = CalibrationArtifact(spec=a.spec, tensors=dict(a.tensors) | {"0.salient.fill": torch.zeros(3, 3)})
    with pytest.raises(CodecError, match="1-D tensor 'fill'"):
        build_codec(spec, artifact=bad)
    nan = CalibrationArtifact(
        spec=a.spec, tensors=dict(a.tensors) | {"0.salient.fill": torch.full((DIM,), float("nan"))}
    )
    with pytest.raises(CodecError, match="NaN"):
        build_codec(spec, artifact=nan)


def test_not_a_token_reducer_for_the_rx() -> None:
    codec = _codec("salient:k=10|int8|zstd")
    no_reduction = CodecSupport(reason="test split")
    check_codec_support(codec, no_reduction, "TestSplit", token_scores=())
    with pytest.raises(CodecError, match="does not support token reduction"):
        check_codec_support(build_codec("prune:k=10|int8|zstd"), no_reduction, "TestSplit")


# ---- on the tiny LLaVA's features ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_features(model_dir: Path) -> list[torch.Tensor]:
    half = load_tx_half(model_dir, SplitPoint.AFTER_VISION_TOWER)
    with torch.inference_mode():
        return [half.encode(half.preprocess([make_scene(s).image])).features.clone() for s in range(10)]


def test_on_tiny_llava_features(llava_features: list[torch.Tensor]) -> None:
    spec = "salient:k=16|pca:k=16|linear:bits=4,scale=fp16|zstd"
    codec = build_codec(spec, artifact=fit_stages(spec, llava_features[:8]))
    int8 = build_codec("int8")
    for x in llava_features[8:]:
        payload = codec.encode(x)
        y = codec.decode(payload, x.shape)
        assert y.shape == x.shape == (64, 64)
        assert len(payload) < len(int8.encode(x)) / 8
        kept = _salient(codec).keep_indices(x)
        cos = torch.nn.functional.cosine_similarity(y[kept], x[kept], dim=-1)
        assert float(cos.mean()) > 0.9


# ---- linear: scale=fp16 --------------------------------------------------------------------------


def test_fp16_scales_halve_the_scale_bytes_and_keep_the_error_bound() -> None:
    x = TEST[0] * 7
    fp32, fp16 = build_codec("linear:bits=4|raw"), build_codec("linear:bits=4,scale=fp16|raw")
    assert fp32.spec == "linear:bits=4,granularity=token|raw"  # the default keeps its spec
    assert fp16.spec == "linear:bits=4,granularity=token,scale=fp16|raw"
    assert len(fp32.encode(x)) - len(fp16.encode(x)) == 2 * TOKENS
    fields = fp16.tensor_stages[0].encode({"x": x}, CodecContext(TOKENS, DIM, torch.float32))
    scale = fields["scale"]
    assert scale.dtype == torch.float16
    y = fp16.decode(fp16.encode(x), x.shape)
    assert bool(((y - x).abs() <= scale.float().unsqueeze(1) / 2 + 1e-6).all())
    # Rounded up, never down: max |x| of each token is on the grid's range.
    assert bool((scale.float() * 7 >= x.abs().amax(1) - 1e-6).all())
    for granularity in ("channel", "group,group=8"):
        codec = build_codec(f"linear:bits=3,granularity={granularity},scale=fp16|zstd")
        assert codec.decode(codec.encode(x), x.shape).shape == x.shape


def test_fp16_scales_at_the_ends_of_the_range() -> None:
    codec = build_codec("linear:bits=4,scale=fp16|raw")
    tiny = torch.full((4, DIM), 1e-9)
    huge = torch.full((4, DIM), 1e7)
    assert bool(torch.isfinite(codec.decode(codec.encode(tiny), tiny.shape)).all())
    y = codec.decode(codec.encode(huge), huge.shape)  # capped scale: codes clip, values stay finite
    assert bool(torch.isfinite(y).all()) and float(y.max()) == pytest.approx(65504 * 7)
    with pytest.raises(CodecError, match="only to the symmetric grid"):
        build_codec("linear:bits=4,symmetric=0,scale=fp16")
    layout = codec.layout(CodecContext(4, DIM, torch.float32))
    bad = pack(
        {
            "q": torch.zeros(layout["q"].shape, dtype=torch.uint8),
            "scale": torch.full((4,), float("inf")).half(),
        },
        layout,
    )
    with pytest.raises(CodecError, match="finite"):
        codec.decode(bad, (4, DIM))
