"""Token-reducing codec stages (prune, pool, tome): shapes, counts, hostile payloads, end to end."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codecs import Codec, CodecContext, TokenReducer, build_codec
from shared.codecs.prune import Prune
from shared.codecs.serialize import pack
from shared.codecs.tome import ToMe, bipartite_merge
from shared.errors import CodecError, PacketTooLargeError
from shared.split import CodecSupport, check_codec_support

REJECTED = (CodecError, PacketTooLargeError)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
fast = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REDUCERS = [
    "prune:0.5",
    "prune:k=5",
    "prune:ratio=0.3",
    "tome:keep=0.5",
    "tome:r=3",
    "tome:keep=0.2",
]
SQUARE_REDUCERS = ["pool:2", "pool:3", "pool:tokens=4", "pool:tokens=10"]
TAILS = ["", "|zstd", "|int8|zstd", "|fp16", "|linear:4|zstd", "|raw|zstd"]


def features(tokens: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, dim, generator=g) * torch.rand(tokens, 1, generator=g) * 3).to(dtype)


def round_trip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    shape = codec.decoded_shape(*x.shape)
    return codec.decode(codec.encode(x), shape, x.dtype)


# ---- shapes, dtypes, counts ------------------------------------------------------------------


@fast
@given(
    st.sampled_from(REDUCERS),
    st.sampled_from(TAILS),
    st.integers(1, 40),
    st.integers(1, 24),
    st.sampled_from(FLOATS),
)
def test_reducers_keep_dim_and_dtype_and_match_decoded_shape(
    reducer: str, tail: str, tokens: int, dim: int, dtype: torch.dtype
) -> None:
    codec = build_codec(reducer + tail)
    x = features(tokens, dim, dtype)
    y = round_trip(codec, x)
    t_out, d_out = codec.decoded_shape(tokens, dim)
    assert y.shape == (t_out, d_out) and d_out == dim and y.dtype == dtype
    assert 1 <= t_out <= tokens
    assert bool(torch.isfinite(y).all())


@fast
@given(st.sampled_from(SQUARE_REDUCERS), st.sampled_from(TAILS), st.integers(1, 9), st.sampled_from(FLOATS))
def test_pool_shapes(reducer: str, tail: str, side: int, dtype: torch.dtype) -> None:
    codec = build_codec(reducer + tail)
    x = features(side * side, 8, dtype)
    y = round_trip(codec, x)
    assert y.shape == codec.decoded_shape(side * side, 8) and y.dtype == dtype
    out_side = math.isqrt(y.shape[0])
    assert out_side**2 == y.shape[0] and out_side <= side


def test_decoded_counts() -> None:
    assert build_codec("prune:0.5|int8|zstd").decoded_shape(64, 64) == (32, 64)
    assert build_codec("prune:k=10").decoded_shape(64, 3) == (10, 3)
    assert build_codec("prune:k=100").decoded_shape(64, 3) == (64, 3)
    assert build_codec("pool:2|fp16|zstd").decoded_shape(64, 64) == (16, 64)
    assert build_codec("pool:2").decoded_shape(576, 1024) == (144, 1024)  # LLaVA-1.5's 24x24 grid
    assert build_codec("pool:2").decoded_shape(25, 4) == (9, 4)  # ragged edge kept
    assert build_codec("pool:tokens=144").decoded_shape(576, 4) == (144, 4)
    assert build_codec("pool:tokens=1000").decoded_shape(64, 4) == (64, 4)  # never upsamples
    assert build_codec("tome:keep=0.5").decoded_shape(64, 64) == (32, 64)
    assert build_codec("tome:r=16").decoded_shape(64, 64) == (48, 64)
    assert build_codec("tome:r=100").decoded_shape(64, 64) == (1, 64)
    assert build_codec("prune:0.5|tome:keep=0.5").decoded_shape(64, 8) == (16, 8)
    assert build_codec("int8").decoded_shape(64, 64) == (64, 64)
    assert build_codec("int8").token_reducers == ()
    assert [s.name for s in build_codec("pool:2|int8|zstd").token_reducers] == ["pool"]
    with pytest.raises(CodecError, match="square"):
        build_codec("pool:2").decoded_shape(63, 4)
    with pytest.raises(CodecError, match="positive"):
        build_codec("prune:0.5").decoded_shape(0, 4)


# ---- prune --------------------------------------------------------------------------------------


@fast
@given(st.integers(1, 50), st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_prune_keeps_top_norms_in_original_order(tokens: int, ratio: float, seed: int) -> None:
    x = features(tokens, 6, seed=seed)
    stage = Prune(ratio=ratio)
    kept = stage.keep_indices(x)
    assert torch.all(kept[1:] > kept[:-1])  # ascending: original order
    y = build_codec(f"prune:ratio={ratio!r}|raw").encode(x)  # exercises the pipeline too
    assert len(y) > 0
    norms = x.norm(dim=1)
    dropped = torch.ones(tokens, dtype=torch.bool)
    dropped[kept] = False
    if dropped.any():
        assert float(norms[kept].min()) >= float(norms[dropped].max())
    out = stage.encode({"x": x}, None)["x"]  # type: ignore[arg-type]
    assert torch.equal(out, x[kept])


def test_prune_is_lossless_on_kept_tokens() -> None:
    x = features(20, 16)
    codec = build_codec("prune:k=7|raw|zstd")
    y = round_trip(codec, x)
    kept = Prune(k=7).keep_indices(x)
    assert torch.equal(y, x[kept])


def test_prune_by_given_scores() -> None:
    x = features(10, 4)
    scores = torch.tensor([0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    codec = build_codec("prune:k=4,score=cls|raw")
    assert codec.score_kind == "cls" and build_codec("prune:0.5|int8").score_kind == ""
    y = codec.decode(codec.encode(x, scores=scores), (4, 4))
    assert torch.equal(y, x[[1, 3, 5, 7]])
    with pytest.raises(CodecError, match="ranks tokens by 'cls' scores, which the Tx half must provide"):
        codec.encode(x)
    with pytest.raises(CodecError, match="10 finite values"):
        codec.encode(x, scores=scores[:9])
    with pytest.raises(CodecError, match="must be the first stage"):
        build_codec("pool:2|prune:0.5,score=cls")


def test_llava_cls_scores_match_the_towers_attention(tx: Any, images: list) -> None:
    from shared.split.llava import LlavaTxHalf

    half = tx.engine.half
    assert isinstance(half, LlavaTxHalf) and half.token_scores == ("cls",)
    inputs = half.preprocess([images[2]])
    scored = half.encode_scored(inputs, "cls")
    assert torch.equal(scored.features, half.encode(inputs).features)
    assert scored.scores is not None and scored.scores.shape == (scored.features.shape[0],)
    # The eager attention weights of the layer the features come from (a copy: the Tx keeps sdpa).
    import copy

    tower = copy.deepcopy(half.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.inference_mode():
        out = tower(inputs["pixel_values"], output_attentions=True, return_dict=True)
    expected = out.attentions[half.vision_feature_layer].mean(dim=1)[0, 0, 1:]
    torch.testing.assert_close(scored.scores, expected.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(CodecError, match="cannot compute 'norm' token scores"):
        half.encode_scored(inputs, "norm")


# ---- pool ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["pool:2", "pool:3", "pool:tokens=9", "pool:tokens=1"])
@pytest.mark.parametrize("side", [1, 4, 5, 8])
def test_pooling_a_constant_grid_is_exact(spec: str, side: int) -> None:
    value = torch.arange(-6, 6) * 0.375  # window sums of these are exact, so the means are too
    x = value.repeat(side * side, 1)
    y = round_trip(build_codec(spec + "|raw"), x)
    assert torch.equal(y, value.repeat(y.shape[0], 1))
    z = round_trip(build_codec(spec + "|raw"), torch.full((side * side, 3), 0.1))
    torch.testing.assert_close(z, torch.full_like(z, 0.1), rtol=1e-6, atol=0)


def test_pool_averages_2x2_blocks_row_major() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(16, 1)  # grid [[0..3], [4..7], ...]
    y = round_trip(build_codec("pool:2|raw"), x)
    assert y.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_pool_needs_a_square_grid() -> None:
    with pytest.raises(CodecError, match=r"square patch grid.*65 tokens"):
        build_codec("pool:2|int8").encode(torch.ones(65, 4))


# ---- ToMe ---------------------------------------------------------------------------------------


@fast
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16))
def test_tome_preserves_the_size_weighted_mean(tokens: int, target: int, seed: int) -> None:
    target = min(target, tokens)
    x = features(tokens, 5, torch.float64, seed=seed).float()
    merged, sizes = bipartite_merge(x, target)
    assert merged.shape == (target, 5) and sizes.shape == (target,)
    assert float(sizes.sum()) == tokens and bool((sizes >= 1).all())
    weighted = (merged.double() * sizes.unsqueeze(1)).sum(0) / tokens
    torch.testing.assert_close(weighted, x.double().mean(0), rtol=1e-5, atol=1e-5)


def test_tome_keeps_the_order_of_representatives() -> None:
    # Pairs of near-duplicates (0,1), (2,3), ...: each merges into its odd partner, in order.
    base = torch.eye(8) * 10
    x = torch.stack([base[i // 2] + (0.01 if i % 2 else 0.0) for i in range(16)])
    merged, sizes = bipartite_merge(x, 8)
    assert sizes.tolist() == [2.0] * 8
    assert torch.allclose(merged, base + 0.005)
    assert ToMe(keep=0.5).output_tokens(16) == 8


def test_tome_of_identical_tokens_is_exact() -> None:
    x = torch.full((10, 3), 1.5)
    assert torch.equal(round_trip(build_codec("tome:keep=0.3|raw"), x), torch.full((3, 3), 1.5))


# ---- spec parsing and order rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("int8|prune:0.5", r"token reducer 'prune' cannot follow 'int8'.*come first"),
        ("fp16|pool:2|zstd", r"token reducer 'pool' cannot follow 'fp16'"),
        ("raw|tome:r=2", r"token reducer 'tome' cannot follow 'raw'"),
        ("zstd|prune:0.5", r"tensor stage 'prune' cannot follow byte stage 'zstd'"),
        ("pool", r"exactly one of a window"),
        ("pool:2,tokens=4", r"exactly one of a window"),
        ("prune", r"exactly one of a keep-ratio"),
        ("prune:0.5,k=3", r"exactly one of a keep-ratio"),
        ("prune:1.5", r"ratio must be a number in \[0, 1\]"),
        ("tome", r"exactly one of a merge count"),
        ("tome:keep=2", r"keep must be a number in \[0, 1\]"),
        ("prune:0.5|prune:0.5", r"'prune' appears twice"),
    ],
)
def test_bad_specs_are_refused(spec: str, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        build_codec(spec)


def test_canonical_specs_and_reducer_class() -> None:
    assert build_codec("prune:0.5|int8|zstd").spec == "prune:ratio=0.5,k=0,score=norm|int8|zstd:level=3"
    assert build_codec("pool:2").spec == "pool:factor=2,tokens=0"
    assert build_codec("tome:keep=0.5").spec == "tome:r=0,keep=0.5"
    assert all(isinstance(s, TokenReducer) for s in build_codec("prune:0.5|pool:2|tome:r=1").stages)


# ---- hostile payloads ---------------------------------------------------------------------------


def test_table_declaring_more_tokens_than_the_header_is_refused_before_allocation() -> None:
    codec = build_codec("prune:0.5|int8|zstd")
    declared = codec.decoded_shape(64, 64)  # (32, 64): what the header says
    # A payload whose table claims 2^30 tokens (about 64 GiB of int8 codes) but holds none.
    table = struct.pack("<BB", 1, 2)
    table += struct.pack("<B1sBB2I", 1, b"q", 4, 2, 2**30, 64)
    table += struct.pack("<B5sBB1I", 5, b"scale", 1, 1, 2**30)
    bomb = zstandard.ZstdCompressor().compress(table)
    with pytest.raises(PacketTooLargeError, match="declares shape"):
        codec.decode(bomb, declared)
    # An honest payload for 64 tokens does not pass as the 32 the header declares either.
    honest = build_codec("int8").encode(features(64, 64))
    with pytest.raises(REJECTED):
        codec.decode(honest, declared)


def test_payload_for_more_tokens_than_declared_is_rejected() -> None:
    x = features(64, 16)
    payload = build_codec("pool:2|int8|zstd").encode(x)
    for shape in [(64, 16), (4, 16), (17, 16), (16, 15)]:
        with pytest.raises(REJECTED):
            build_codec("pool:2|int8|zstd").decode(payload, shape)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("spec", ["prune:0.5|int8|zstd", "pool:2|fp16", "tome:keep=0.5|raw|zstd"])
def test_nan_and_inf_are_refused_on_encode(spec: str, bad: float) -> None:
    x = features(16, 8)
    x[3, 2] = bad
    with pytest.raises(CodecError, match="NaN"):
        build_codec(spec).encode(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("spec", ["prune:0.5|raw|zstd", "pool:2|raw", "tome:keep=0.5|bf16|zstd"])
def test_payload_carrying_nan_or_inf_is_rejected(spec: str, bad: float) -> None:
    codec = build_codec(spec)
    shape = codec.decoded_shape(16, 8)
    ctx = CodecContext(shape[0], shape[1], torch.float32)
    layout = codec.layout(ctx)  # the wire layout for the declared (reduced) shape
    y = torch.ones(shape)
    y[1, 1] = bad
    data = pack({"x": y.to(layout["x"].dtypes[0])}, layout)
    for stage in codec.byte_stages:
        data = stage.encode(data, ctx)
    with pytest.raises(CodecError, match="NaN or Inf"):
        codec.decode(data, shape)


# ---- config-time support checks ------------------------------------------------------------------


def test_support_check_names_stage_family_and_reason() -> None:
    codec = build_codec("pool:2|int8|zstd")
    check_codec_support(codec, CodecSupport(token_reduction=True), "LLaVA")
    check_codec_support(build_codec("int8"), CodecSupport(reason="nope"), "Qwen2VL")
    with pytest.raises(CodecError, match=r"refused for Qwen2VL: its stage 'pool'.*\(patch grid needed\)"):
        check_codec_support(codec, CodecSupport(reason="patch grid needed"), "Qwen2VL")
    scored = build_codec("prune:0.5,score=cls|int8")
    check_codec_support(scored, CodecSupport(token_reduction=True), "LLaVA", token_scores=("cls",))
    check_codec_support(scored, CodecSupport(token_reduction=True), "Rx side")  # the Rx needs no scores
    with pytest.raises(CodecError, match=r"refused for X: .*'cls' scores, which this Tx half cannot"):
        check_codec_support(scored, CodecSupport(token_reduction=True), "X", token_scores=())


def test_qwen2_vl_tx_refuses_token_reduction_before_inference(tmp_path: Path) -> None:
    from shared.config import TxSettings
    from shared.models.tiny_qwen2_vl import build_tiny_qwen2_vl
    from tx_service.engine import TxEngine

    folder = build_tiny_qwen2_vl(tmp_path / "qwen2_vl")
    settings_ = TxSettings(model=str(folder), cache_dir=tmp_path, rx_address="127.0.0.1:9")
    engine = TxEngine.load(settings_)
    assert engine.half.codec_support.token_reduction is False
    with pytest.raises(
        CodecError, match=r"refused for QwenVLTxHalf.*stage 'prune'.*token reduction.*patch merger"
    ):
        engine.codec("prune:0.5|int8|zstd")
    with pytest.raises(CodecError, match=r"'pool'.*does not support token reduction"):
        TxEngine.load(settings_.model_copy(update={"codec": "pool:2|int8|zstd"}))


def test_rx_refuses_token_reduction_for_a_split_without_support(rx: Any, tx: Any, images: list) -> None:
    from rx_service.engine import RxEngine

    header = tx.engine.encode(images[0], "prune:0.5|int8|zstd").header
    engine: RxEngine = rx.engine
    engine.check_header(header)  # LLaVA supports it
    unsupported = RxEngine(
        settings=engine.settings,
        half=_Unsupported(engine.half),
        model_id=engine.model_id,
        fingerprint=engine.fingerprint,
        architecture="SomeRxHalf",
    )
    with pytest.raises(CodecError, match=r"refused for SomeRxHalf.*'prune'.*\(fixed grid\)"):
        unsupported.check_header(header)


class _Unsupported:
    codec_support = CodecSupport(reason="fixed grid")

    def __init__(self, half: Any) -> None:
        self.feature_dim = half.feature_dim


# ---- end to end over loopback gRPC with the tiny LLaVA ------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["prune:0.5|int8|zstd", "pool:2|fp16|zstd", "tome:keep=0.5|int8|zstd", "prune:0.5,score=cls|int8|zstd"],
)
def test_token_reducing_codecs_end_to_end(spec: str, tx: Any, images: list) -> None:
    from tx_service.client import TxClient

    image = images[2]
    encoded = tx.engine.encode(image, spec)
    full = tx.engine.encode(image, "int8")
    tokens, dim = (int(n) for n in full.header.shape)
    expected = build_codec(spec).decoded_shape(tokens, dim)
    assert tuple(encoded.header.shape) == expected and expected[0] < tokens
    assert list(encoded.header.meta["tokens_per_image"].values) == [expected[0]]
    with TxClient(tx.address) as client:
        answer = client.ask(image, "What is in the image?", codec=spec, max_new_tokens=4)
        reference = client.ask(image, "What is in the image?", codec="int8", max_new_tokens=4)
    assert answer.token_ids and answer.codec_spec == build_codec(spec).spec
    assert 0 < answer.payload_bytes < reference.payload_bytes
    # The Tx reports the raw features before token reduction: ratios divide by them (issue 14).
    assert answer.feature_bytes == tokens * dim * 4


def test_token_reduction_needs_a_single_image(tx: Any, images: list) -> None:
    from shared.split import features_for_codec

    half = tx.engine.half
    features = half.encode(half.preprocess(images[:2]))
    with pytest.raises(CodecError, match="single image per request; got 2 images"):
        features_for_codec(build_codec("prune:0.5|int8"), features)


def test_offline_evaluation_runs_token_reducing_codecs(model_dir: Path) -> None:
    from shared.reference.evaluate import evaluate_split, heldout_items

    items = heldout_items(n_images=1, per_image=1)
    full = evaluate_split(model_dir, items, "int8")
    for spec in ["pool:2|int8|zstd", "prune:0.5,score=cls|int8|zstd"]:
        reduced = evaluate_split(model_dir, items, spec)
        assert len(reduced.answers) == 1 and reduced.payload_bytes[0] < full.payload_bytes[0]
