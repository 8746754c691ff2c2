"""Codec library: round trips, quality targets, spec parsing and hostile payloads."""

from __future__ import annotations

import hashlib
import resource
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.codecs import PRESETS, STAGES, Codec, TensorStage, build_codec, register_stage
from shared.codecs.base import CodecContext, Fields, Layout
from shared.codecs.serialize import pack
from shared.errors import CodecError, PacketTooLargeError

REJECTED = (CodecError, PacketTooLargeError)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# Same-width integer dtype for bit-exact comparison, and the exponent mask that marks NaN/Inf.
BITS = {
    torch.float32: (np.uint32, np.int32, torch.int32, 0x7F800000, 0x40000000),
    torch.float16: (np.uint16, np.int16, torch.int16, 0x7C00, 0x4000),
    torch.bfloat16: (np.uint16, np.int16, torch.int16, 0x7F80, 0x4000),
}
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def realistic(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian features with log-normal per-channel scales and 0.1% outliers 5x their channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g) * torch.exp(0.3 * torch.randn(dim, generator=g))
    outliers = torch.rand(tokens, dim, generator=g) < 1e-3
    x[outliers] *= 5
    return x


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype][2])


@st.composite
def finite_features(draw: st.DrawFn, dtypes: list[torch.dtype] = FLOATS) -> torch.Tensor:
    """Any finite values (subnormals, -0.0, extremes) as raw bit patterns."""
    dtype = draw(st.sampled_from(dtypes))
    unsigned, signed, _, exp_mask, exp_top = BITS[dtype]
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 48)))
    raw = draw(arrays(unsigned, shape))
    nonfinite = (raw & exp_mask) == exp_mask
    raw[nonfinite] &= ~np.array(exp_top, dtype=unsigned)
    return torch.from_numpy(raw.view(signed).copy()).view(dtype)


# --- round trips -------------------------------------------------------------------------------


@fast
@given(finite_features())
def test_lossless_is_bit_exact(x: torch.Tensor) -> None:
    codec = build_codec("lossless")
    y = codec.decode(codec.encode(x), shape=tuple(x.shape), dtype=x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(bits_of(y), bits_of(x))


def preset_codec(name: str) -> Codec:
    """A preset's codec; calibrated presets (balanced, tiny) fitted on a few synthetic features."""
    from shared.codecs.calibrate import fit_stages, parse_stages
    from shared.codecs.calibration import needs_calibration

    if not any(map(needs_calibration, parse_stages(name)[1])):
        return build_codec(name)
    return build_codec(name, artifact=fit_stages(name, [realistic(36, 64, seed) for seed in range(4)]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_non_contiguous_input(preset: str) -> None:
    x = realistic(64, 36).t()  # 36 tokens: a square grid, so token-pooling presets apply too
    codec = preset_codec(preset)
    payload = codec.encode(x)
    assert payload == codec.encode(x.contiguous())
    shape = codec.decoded_shape(36, 64)  # what the packet header declares (fewer tokens for reducers)
    y = codec.decode(payload, shape)
    assert tuple(y.shape) == shape
    if preset in ("lossless", "fp16", "int8"):
        assert cosine_per_token(x, y).min() > 0.999


def test_lossless_without_byte_stage() -> None:
    x = realistic(5, 7).to(torch.bfloat16)
    codec = build_codec("raw")
    assert torch.equal(bits_of(codec.decode(codec.encode(x), (5, 7), torch.bfloat16)), bits_of(x))


def test_fp16_round_trip_is_close() -> None:
    x = realistic(64, 256)
    codec = build_codec("fp16")
    y = codec.decode(codec.encode(x), (64, 256))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x, rtol=2**-11, atol=2**-24)
    assert len(codec.encode(x)) < 0.6 * len(build_codec("lossless").encode(x))


def test_fp16_rejects_values_out_of_range() -> None:
    x = torch.ones(2, 4)
    x[1, 2] = 1e6
    with pytest.raises(CodecError, match=r"1 feature values exceed the float16 range"):
        build_codec("fp16").encode(x)


def test_bf16_round_trip_is_close() -> None:
    x = realistic(16, 64) * 1e6  # beyond float16 range, fine for bfloat16
    codec = build_codec("bf16|zstd")
    torch.testing.assert_close(codec.decode(codec.encode(x), (16, 64)), x, rtol=2**-8, atol=0)


@pytest.mark.parametrize("dim", [64, 256, 1024])
def test_int8_payload_is_at_most_30_percent_of_lossless(dim: int) -> None:
    x = realistic(576, dim)
    ratio = len(build_codec("int8").encode(x)) / len(build_codec("lossless").encode(x))
    assert ratio <= 0.30, f"int8/lossless = {ratio:.3f} at dim {dim}"


def test_int8_quality_on_realistic_features() -> None:
    x = realistic(576, 1024)
    codec = build_codec("int8")
    y = codec.decode(codec.encode(x), (576, 1024))
    assert y.shape == (576, 1024) and y.dtype == torch.float32
    assert cosine_per_token(x, y).min() >= 0.999
    half_step = x.abs().amax(dim=1, keepdim=True) / 127 / 2
    assert bool(((y - x).abs() <= half_step * (1 + 1e-5)).all())


@fast
@given(finite_features())
def test_int8_error_is_at_most_half_a_step(x: torch.Tensor) -> None:
    codec = build_codec("int8")
    payload = codec.encode(x)
    y = codec.decode(payload, tuple(x.shape), torch.float32)
    xf = x.float()
    half_step = xf.abs().amax(dim=1, keepdim=True) / 127 / 2
    # The absolute slack covers scales that underflow for tokens of subnormals only.
    assert bool(((y - xf).abs() <= half_step * (1 + 1e-5) + 1e-38).all())
    assert codec.decode(payload, tuple(x.shape), x.dtype).dtype == x.dtype


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_linear_bits_and_granularity(bits: int, granularity: str) -> None:
    x = realistic(9, 70)  # odd sizes exercise the bit-packing tail
    codec = build_codec(f"linear:{bits},granularity={granularity}|zstd")
    y = codec.decode(codec.encode(x), (9, 70))
    axis = 1 if granularity == "token" else 0
    half_step = x.abs().amax(dim=axis, keepdim=True) / (2 ** (bits - 1) - 1) / 2
    assert bool(((y - x).abs() <= half_step * (1 + 1e-5)).all())


def test_int8_all_zero_token_decodes_to_zero() -> None:
    x = realistic(3, 64)
    x[1] = 0
    codec = build_codec("int8")
    y = codec.decode(codec.encode(x), (3, 64))
    assert bool((y[1] == 0).all())


# --- input validation ----------------------------------------------------------------------------


def test_encode_rejects_nan_and_inf() -> None:
    x = torch.zeros(4, 8)
    x[0, :3] = float("nan")
    with pytest.raises(CodecError, match=r"^features contain 3 NaN / 0 Inf values; refusing to encode$"):
        build_codec("int8").encode(x)
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    x[2, 1], x[3, 3] = float("inf"), float("-inf")
    with pytest.raises(CodecError, match=r"0 NaN / 2 Inf"):
        build_codec("lossless").encode(x)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.zeros(4), r"must be 2-D \[tokens, dim\], got shape \(4,\)"),
        (torch.zeros(2, 3, 4), r"must be 2-D"),
        (torch.zeros(0, 16), r"must not be empty, got shape \(0, 16\)"),
        (torch.zeros(4, 8, dtype=torch.int32), r"must be float32, float16, bfloat16, got int32"),
        (torch.zeros(4, 8, dtype=torch.float64), r"got float64"),
        ([[1.0, 2.0]], r"must be a torch.Tensor, got list"),
    ],
)
def test_encode_rejects_bad_input(features: object, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        build_codec("int8").encode(features)  # type: ignore[arg-type]


# --- spec parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("int8", "int8|zstd:level=3"),
        ("lossless", "raw|zstd:level=3"),
        ("fp16", "fp16|zstd:level=3"),
        ("int8|zstd:3", "int8|zstd:level=3"),
        (" int8 | zstd : level = 9 ", "int8|zstd:level=9"),
        ("linear:4", "linear:bits=4,granularity=token"),
        ("linear:granularity=channel,bits=6|zstd", "linear:bits=6,granularity=channel|zstd:level=3"),
        ("raw", "raw"),
        ("zstd:1", "zstd:level=1"),
    ],
)
def test_canonical_spec(spec: str, canonical: str) -> None:
    codec = build_codec(spec)
    assert codec.spec == canonical
    assert codec.name == spec.strip()
    assert build_codec(codec.spec).spec == canonical


def test_spec_that_reads_as_a_preset_is_refused() -> None:
    from shared.codecs.linear_quant import Int8

    with pytest.raises(
        CodecError, match=r"'int8' alone would be read as the preset 'int8' .*write 'raw\|int8'"
    ):
        Codec("mine", [Int8()])
    assert build_codec("raw|int8").spec == "raw|int8"


def test_presets_build() -> None:
    assert set(PRESETS) >= {"lossless", "fp16", "int8", "balanced", "tiny"}
    for name in PRESETS:
        assert isinstance(preset_codec(name), Codec)


def test_fingerprints_are_stable_and_distinct() -> None:
    assert build_codec("int8").fingerprint == "sha256:" + hashlib.sha256(b"int8|zstd:level=3").hexdigest()
    assert build_codec("int8").fingerprint == build_codec("int8|zstd:level=3").fingerprint
    specs = ["lossless", "fp16", "int8", "int8|zstd:4", "linear:4|zstd", "bf16|zstd", "raw", "int8"]
    fingerprints = {build_codec(s).fingerprint for s in specs}
    assert len(fingerprints) == len(set(specs))
    assert all(f.startswith("sha256:") and len(f) == 7 + 64 for f in fingerprints)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", r"must be a non-empty string"),
        (
            "gzip",
            r"unknown codec stage 'gzip'; valid stages: .*int8.*zstd; "
            r"presets: balanced, fp16, int8, lossless, tiny",
        ),
        ("int8|lz4", r"unknown codec stage 'lz4'"),
        ("int8||zstd", r"stage 2 is empty"),
        ("zstd:level=99", r"stage 'zstd': level must be an integer in \[1, 22\], got '99'"),
        ("zstd:fast", r"level must be an integer"),
        ("zstd:lvl=3", r"stage 'zstd' has no parameter 'lvl'; valid parameters: level"),
        ("zstd:3,4", r"unexpected positional parameter '4'"),
        ("zstd:level=3,level=4", r"parameter 'level' given twice"),
        ("zstd:", r"':' must be followed by parameters"),
        ("zstd:level=", r"needs both a name and a value"),
        ("int8:4", r"stage 'int8' takes no parameters"),
        ("linear:bits=1", r"bits must be an integer in \[2, 8\]"),
        ("linear:granularity=row", r"granularity must be one of token, channel"),
        ("zstd|int8", r"tensor stage 'int8' cannot follow byte stage 'zstd'"),
        ("int8|linear:4|zstd", r"two quantizers \('int8' and 'linear'\)"),
        ("fp16|int8|zstd", r"two quantizers"),
        ("int8|zstd|zstd", r"stage 'zstd' appears twice"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        build_codec(spec)


def test_stage_needing_a_consumed_field_is_rejected() -> None:
    @register_stage
    class Negate(TensorStage):
        """Test-only stage: x -> -x."""

        name = "test_negate"

        def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
            return fields

        def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
            return {"x": -fields["x"]}

        def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
            return {"x": -fields["x"]}

    try:
        codec = build_codec("test_negate|int8|zstd")
        x = realistic(4, 64)
        assert cosine_per_token(codec.decode(codec.encode(x), (4, 64)), x).min() > 0.999
        with pytest.raises(
            CodecError, match=r"'test_negate' needs field\(s\) x, but after 'int8' .* q, scale"
        ):
            build_codec("int8|test_negate")
        with pytest.raises(ValueError, match="already registered"):

            @register_stage
            class Clash(Negate):
                pass

    finally:
        STAGES.pop("test_negate", None)


# --- hostile payloads ----------------------------------------------------------------------------

SHAPE = (8, 64)


@pytest.fixture(scope="module", params=["int8", "lossless", "fp16"])
def encoded(request: pytest.FixtureRequest) -> tuple[Codec, bytes, torch.Tensor]:
    codec = build_codec(request.param)
    payload = codec.encode(realistic(*SHAPE))
    return codec, payload, codec.decode(payload, SHAPE)


def test_truncated_payloads_are_rejected(encoded: tuple[Codec, bytes, torch.Tensor]) -> None:
    codec, payload, _ = encoded
    for n in range(len(payload)):
        with pytest.raises(REJECTED):
            codec.decode(payload[:n], SHAPE)


def test_extended_payloads_are_rejected(encoded: tuple[Codec, bytes, torch.Tensor]) -> None:
    codec, payload, _ = encoded
    for extra in (b"\x00", b"\xff" * 7, payload):
        with pytest.raises(REJECTED):
            codec.decode(payload + extra, SHAPE)


def test_flipped_bytes_never_decode_to_something_else(encoded: tuple[Codec, bytes, torch.Tensor]) -> None:
    codec, payload, clean = encoded
    rejected = 0
    for i in range(len(payload)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(payload)
            flipped[i] ^= mask
            try:
                y = codec.decode(bytes(flipped), SHAPE)
            except REJECTED:
                rejected += 1
                continue
            # A flip in a bit zstd ignores is harmless; any change to the data must be caught.
            assert torch.equal(y, clean), f"byte {i} ^ {mask:#x} decoded to different features"
    assert rejected >= 0.99 * 3 * len(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from(sorted(PRESETS)))
def test_random_garbage_is_rejected(garbage: bytes, preset: str) -> None:
    with pytest.raises(REJECTED):
        preset_codec(preset).decode(garbage, SHAPE)


@pytest.mark.parametrize("shape", [(8, 63), (7, 64), (64, 8), (16, 64), (9, 64), (1, 1), (8, 128)])
def test_wrong_declared_shape_is_rejected(encoded: tuple[Codec, bytes, torch.Tensor], shape: tuple) -> None:
    codec, payload, _ = encoded
    with pytest.raises(REJECTED):
        codec.decode(payload, shape)


def test_lossless_wrong_declared_dtype_is_rejected() -> None:
    codec = build_codec("lossless")
    payload = codec.encode(realistic(*SHAPE))
    with pytest.raises(REJECTED):
        codec.decode(payload, SHAPE, torch.float16)


@pytest.mark.parametrize("shape", [(0, 64), (8,), (8, 64, 1), (-1, 64), (8.0, 64), (True, 64), "8x64"])
def test_invalid_declared_shape(shape: object) -> None:
    payload = build_codec("int8").encode(realistic(*SHAPE))
    with pytest.raises(CodecError, match="declared shape must be two positive ints"):
        build_codec("int8").decode(payload, shape)  # type: ignore[arg-type]


def test_invalid_declared_dtype_and_payload_type() -> None:
    codec = build_codec("int8")
    payload = codec.encode(realistic(*SHAPE))
    with pytest.raises(CodecError, match="declared dtype must be"):
        codec.decode(payload, SHAPE, torch.int8)
    with pytest.raises(CodecError, match="payload must be bytes, got str"):
        codec.decode("payload", SHAPE)  # type: ignore[arg-type]
    assert torch.equal(codec.decode(bytearray(payload), SHAPE), codec.decode(memoryview(payload), SHAPE))


def test_max_decoded_bytes() -> None:
    codec = build_codec("int8")
    payload = codec.encode(realistic(*SHAPE))
    with pytest.raises(PacketTooLargeError, match="the limit is 1000"):
        codec.decode(payload, SHAPE, max_decoded_bytes=1000)
    with pytest.raises(PacketTooLargeError):
        codec.decode(payload, (65_536, 16_384))  # 4 GiB of float32 by default is too much
    assert codec.decode(payload, SHAPE, max_decoded_bytes=4 * 8 * 64).shape == SHAPE


def _table(entries: list[tuple[str, int, tuple[int, ...]]], data: bytes = b"") -> bytes:
    """A tensor table written by hand (see shared/codecs/serialize.py)."""
    out = struct.pack("<BB", 1, len(entries))
    for name, code, shape in entries:
        out += struct.pack(
            f"<B{len(name)}sBB{len(shape)}I", len(name), name.encode(), code, len(shape), *shape
        )
    return out + data


@pytest.mark.parametrize("spec", ["raw|int8", "int8|zstd"])
def test_table_declaring_a_huge_shape_is_rejected(spec: str) -> None:
    huge = _table([("q", 4, (2**31, 2**31)), ("scale", 1, (8,))], b"\x00" * 64)
    payload = huge if spec == "raw|int8" else zstandard.ZstdCompressor().compress(huge)
    with pytest.raises(PacketTooLargeError, match=r"field 'q' declares shape \(2147483648, 2147483648\)"):
        build_codec(spec).decode(payload, SHAPE)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_table([("q", 4, (8, 64))]), r"holds 1 fields, expected 2 \(q, scale\)"),
        (_table([("x", 4, (8, 64)), ("scale", 1, (8,))]), r"field 0 is named 'x', expected 'q'"),
        (_table([("q", 9, (8, 64)), ("scale", 1, (8,))]), r"unknown dtype code 9"),
        (_table([("q", 5, (8, 64)), ("scale", 1, (8,))]), r"'q' has dtype uint8, expected int8"),
        (_table([("q", 4, (4, 64)), ("scale", 1, (8,))]), r"'q' has shape \(4, 64\), expected \(8, 64\)"),
        (_table([("q", 4, (8, 64)), ("scale", 1, (8,))]), r"declares 544 data bytes, payload holds 0"),
        (b"\x02\x02", r"version 2 is not supported"),
        (b"\x01", r"truncated: field count needs 1 bytes at offset 1, only 0 left"),
    ],
)
def test_malformed_tables(table: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        build_codec("raw|int8").decode(table, SHAPE)


@pytest.mark.parametrize(
    ("q", "scale", "message"),
    [
        (torch.full(SHAPE, -128, dtype=torch.int8), torch.ones(8), r"codes must lie in \[-127, 127\]"),
        (torch.zeros(SHAPE, dtype=torch.int8), torch.full((8,), float("nan")), "scales must be finite"),
        (torch.zeros(SHAPE, dtype=torch.int8), -torch.ones(8), "scales must be finite and >= 0"),
        (torch.full(SHAPE, 127, dtype=torch.int8), torch.full((8,), 3e38), "contain NaN or Inf"),
    ],
)
def test_invalid_values_are_rejected(q: torch.Tensor, scale: torch.Tensor, message: str) -> None:
    codec = build_codec("int8|zstd")
    ctx = CodecContext(*SHAPE, torch.float32)
    payload = zstandard.ZstdCompressor().compress(pack({"q": q, "scale": scale}, codec.layout(ctx)))
    with pytest.raises(CodecError, match=message):
        codec.decode(payload, SHAPE)


def _zeros_frame(size: int, *, content_size: bool) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compressobj(
        size=size if content_size else -1
    )
    chunk = bytes(1 << 20)
    return b"".join([cobj.compress(chunk) for _ in range(size >> 20)] + [cobj.flush()])


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_zstd_bomb_declaring_1_gib_is_rejected_without_allocating_it() -> None:
    bomb = _zeros_frame(1 << 30, content_size=True)
    assert zstandard.frame_content_size(bomb) == 1 << 30 and len(bomb) < 64 * 1024
    before = _peak_rss_mib()
    with pytest.raises(PacketTooLargeError, match=r"zstd frame declares 1073741824 bytes"):
        build_codec("int8").decode(bomb, (576, 1024))  # large enough to pass the payload-size check
    assert _peak_rss_mib() - before < 256


def test_zstd_bomb_without_content_size_is_rejected() -> None:
    bomb = _zeros_frame(64 << 20, content_size=False)
    assert zstandard.frame_content_size(bomb) == -1
    before = _peak_rss_mib()
    with pytest.raises(PacketTooLargeError, match=r"decompresses to more than \d+ bytes"):
        build_codec("int8").decode(bomb, (576, 1024))
    assert _peak_rss_mib() - before < 32


def test_frame_without_content_size_still_decodes() -> None:
    x = realistic(*SHAPE)
    serialized = zstandard.ZstdDecompressor().decompress(build_codec("int8").encode(x))
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(serialized)
    assert zstandard.frame_content_size(frame) == -1
    codec = build_codec("int8")
    assert torch.equal(codec.decode(frame, SHAPE), codec.decode(codec.encode(x), SHAPE))
