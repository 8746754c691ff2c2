"""Quantizer extensions: per-group and asymmetric ``linear``, and the vector-quantized ``ae`` bottleneck."""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codecs import Codec, build_codec
from shared.codecs.base import CodecContext
from shared.codecs.bitpack import pack_bits, pack_wide, packed_len, unpack_bits, unpack_wide
from shared.codecs.calibrate import canonical_spec, fit_stages, parse_stages
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.linear_quant import LinearQuant
from shared.codecs.serialize import max_packed_size, table_size
from shared.errors import CodecError, PacketTooLargeError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _features(tokens: int, dim: int, seed: int, magnitude: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed (a few large values), optionally one-sided, as vision features are.
    return torch.randn(tokens, dim, generator=g) ** 3 * magnitude + offset


def _roundtrip(spec: str, x: torch.Tensor, artifact: CalibrationArtifact | None = None) -> torch.Tensor:
    codec = build_codec(spec, artifact=artifact)
    return codec.decode(codec.encode(x), shape=x.shape, dtype=x.dtype)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).mean())


# ---- linear: group and asymmetric ------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 24),
    groups=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8, 16]),
    bits=st.integers(2, 8),
    symmetric=st.sampled_from([0, 1]),
    granularity=st.sampled_from(["token", "channel", "group"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
)
def test_shapes_and_dtypes_survive(
    tokens: int,
    groups: int,
    group: int,
    bits: int,
    symmetric: int,
    granularity: str,
    dtype: torch.dtype,
    seed: int,
) -> None:
    dim = groups * group
    x = _features(tokens, dim, seed).to(dtype)
    extra = f",group={group}" if granularity == "group" else ""
    spec = f"linear:bits={bits},granularity={granularity}{extra},symmetric={symmetric}|zstd"
    out = _roundtrip(spec, x)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())


def _steps(x: torch.Tensor, granularity: str, group: int, bits: int, symmetric: bool) -> torch.Tensor:
    """The quantization step of every element's scale group, [T, D], in float64."""
    xd = x.double()
    grouped = {"token": xd, "channel": xd.T, "group": xd.reshape(xd.shape[0], -1, group)}[granularity]
    if symmetric:
        step = grouped.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / (2**bits - 1)
    step = step.expand_as(grouped)
    return step.T if granularity == "channel" else step.reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 16),
    groups=st.integers(1, 4),
    group=st.sampled_from([2, 8, 16]),
    bits=st.sampled_from([4, 8]),
    symmetric=st.sampled_from([0, 1]),
    granularity=st.sampled_from(["group", "token", "channel"]),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 5.0, -100.0]),
    seed=st.integers(0, 10_000),
)
def test_error_is_at_most_half_a_step(
    tokens: int,
    groups: int,
    group: int,
    bits: int,
    symmetric: int,
    granularity: str,
    magnitude: float,
    offset: float,
    seed: int,
) -> None:
    x = _features(tokens, groups * group, seed, magnitude, offset)
    extra = f",group={group}" if granularity == "group" else ""
    out = _roundtrip(f"linear:bits={bits},granularity={granularity}{extra},symmetric={symmetric}|zstd", x)
    step = _steps(x, granularity, group, bits, bool(symmetric))
    err = (out.double() - x.double()).abs()
    # Half a step, plus float32 rounding (of the sent minimum: at most 2^-24 * 255.5 steps;
    # of the decoded value: relative 2^-24).
    bound = step / 2 * (1 + 1e-4) + x.double().abs() * 2e-7 + 1e-30
    assert bool((err <= bound).all()), float((err - bound).max())


def test_group_and_asymmetric_beat_per_token_at_4_bits() -> None:
    # One outlier channel per token: per-token scales waste levels on it, groups confine it.
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 20

    def mae(spec: str, features: torch.Tensor) -> float:
        return float((_roundtrip(spec, features) - features).abs().mean())

    token = mae("linear:bits=4|zstd", x)
    assert mae("linear:bits=4,granularity=group,group=16|zstd", x) < 0.5 * token
    # One-sided features (post-GELU-like): asymmetric uses all 16 levels, symmetric only 8 of 15.
    pos = torch.nn.functional.gelu(_features(64, 64, 2))
    assert mae("linear:bits=4,symmetric=0|zstd", pos) < 0.75 * mae("linear:bits=4|zstd", pos)
    # Where a group's range holds 0, 0 is on the asymmetric grid: zeros come back (almost) exact.
    pos[:, ::3] = 0
    out = _roundtrip("linear:bits=4,granularity=group,group=16,symmetric=0|zstd", pos)
    assert float(out[:, ::3].abs().max()) < 1e-6 * float(pos.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_extremes_stay_finite(dtype: torch.dtype, bits: int) -> None:
    top = torch.finfo(dtype).max
    x = torch.tensor([[-top, top, 0.0, 3.0], [-top, -top, -top, top], [0.0, 0.0, 0.0, 0.0]]).to(dtype)
    for spec in (
        f"linear:bits={bits},symmetric=0",
        f"linear:bits={bits},granularity=group,group=2,symmetric=0",
    ):
        out = _roundtrip(f"{spec}|zstd", x)
        assert bool(torch.isfinite(out).all()) and out.dtype == dtype
        step = (2 * top) / (2**bits - 1)
        assert float((out.double() - x.double()).abs().max()) <= step / 2 * (1 + 1e-3)


@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(1, 12),
    groups=st.integers(1, 3),
    bits=st.integers(2, 8),
    symmetric=st.sampled_from([0, 1]),
    seed=st.integers(0, 10_000),
)
def test_bit_packing_is_exact(tokens: int, groups: int, bits: int, symmetric: int, seed: int) -> None:
    group = 8
    x = _features(tokens, groups * group, seed)
    ctx = CodecContext(tokens, groups * group, torch.float32)
    stage = LinearQuant(bits=bits, granularity="group", group=group, symmetric=symmetric)
    fields = stage.encode({"x": x}, ctx)
    n = tokens * groups * group
    # Codes recomputed by hand from the sent scales (and minimums).
    grouped = x.double().reshape(tokens, groups, group)
    scale = fields["scale"].double().unsqueeze(-1)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        expected = torch.round(grouped / divisor).clamp(-qmax, qmax) + (0 if bits == 8 else qmax)
    else:
        expected = torch.round((grouped - fields["min"].double().unsqueeze(-1)) / divisor)
        # Only the ends of a range can fall (at most half a step) off the grid.
        assert int(expected.min()) >= -1 and int(expected.max()) <= 2**bits
        expected = expected.clamp(0, 2**bits - 1)
    q = fields["q"]
    if bits == 8:
        codes = q.reshape(-1).numpy().astype(np.int64)
    else:
        assert q.dtype == torch.uint8 and q.shape == (packed_len(n, bits),)
        codes = unpack_bits(q.numpy(), n, bits).astype(np.int64)
    assert np.array_equal(codes, expected.reshape(-1).numpy().astype(np.int64))
    # The payload is exactly the packed codes, the scales and (asymmetric) the minimums.
    codec = build_codec(f"{stage.spec}|raw")
    payload = codec.encode(x)
    layout = codec.layout(ctx)
    assert len(payload) == max_packed_size(layout)
    per_group = 4 if symmetric else 8  # a float32 scale (and a float32 minimum) per group
    assert len(payload) == table_size(layout) + packed_len(n, bits) + tokens * groups * per_group


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 200), seed=st.integers(0, 10_000))
def test_wide_bit_packing_round_trips(bits: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=n).astype(np.uint16)
    packed = pack_wide(codes, bits)
    assert packed.size == packed_len(n, bits)
    assert np.array_equal(unpack_wide(packed, n, bits), codes)
    if bits <= 8:  # the same bytes as the 8-bit packer
        assert np.array_equal(packed, pack_bits(codes.astype(np.uint8), bits))


def test_default_specs_and_fingerprints_are_unchanged() -> None:
    assert build_codec("linear:4").spec == "linear:bits=4,granularity=token"
    assert build_codec("linear:bits=4,symmetric=1,group=32").spec == "linear:bits=4,granularity=token"
    assert (
        build_codec("linear:4|zstd").fingerprint
        == "sha256:" + hashlib.sha256(b"linear:bits=4,granularity=token|zstd:level=3").hexdigest()
    )
    assert build_codec("linear:4,group").spec == "linear:bits=4,granularity=group,group=32"
    asym = build_codec("linear:bits=3,granularity=group,group=16,symmetric=0")
    assert asym.spec == "linear:bits=3,granularity=group,group=16,symmetric=0"
    assert build_codec(asym.spec).spec == asym.spec
    assert asym.fingerprint != build_codec("linear:bits=3,granularity=group,group=16").fingerprint
    assert canonical_spec("ae:dim=8,hidden=32,vq=0") == "ae:dim=8,hidden=32"
    assert canonical_spec("ae:8,vq=16|zstd") == "ae:dim=8,hidden=128,vq=16,parts=1|zstd:level=3"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("linear:bits=4,symmetric=2", r"symmetric must be an integer in \[0, 1\]"),
        ("linear:bits=4,symmetric=yes", r"symmetric must be an integer in \[0, 1\]"),
        ("linear:bits=4,granularity=group,group=0", r"group must be an integer in \[1, 65536\]"),
        ("linear:bits=4,group=16", "group=16 applies only to granularity=group"),
        ("linear:bits=4,granularity=block", "granularity must be one of token, channel, group"),
        ("linear:4,token,16", "unexpected positional parameter"),
        ("ae:dim=8,vq=1", "vq must be 0 .off. or a codebook size of at least 2"),
        ("ae:dim=8,vq=70000", r"vq must be an integer in \[0, 65536\]"),
        ("ae:dim=8,parts=2", "parts=2 applies only with vq"),
        ("ae:dim=8,vq=16,parts=3", "dim=8 is not a multiple of parts=3"),
        ("ae:dim=8,vq=16|int8|zstd", "two quantizers"),
        ("ae:dim=8,vq=16|fp16", "two quantizers"),
    ],
)
def test_bad_params_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        Codec(*parse_stages(spec))  # configuration-time checks; no calibration needed


def test_group_must_divide_the_feature_dim() -> None:
    codec = build_codec("linear:bits=4,granularity=group,group=24|zstd")
    x = _features(4, 64, 0)
    with pytest.raises(CodecError, match="feature dim 64 is not a multiple of group=24"):
        codec.encode(x)
    payload = build_codec("linear:bits=4,granularity=group,group=16|zstd").encode(x)
    with pytest.raises(CodecError, match="not a multiple of group=24"):
        codec.decode(payload, shape=x.shape)
    assert codec.decode(codec.encode(x[:, :48]), shape=(4, 48)).shape == (4, 48)


@pytest.mark.parametrize(
    "spec",
    [
        "linear:bits=4,granularity=group,group=8",
        "linear:bits=4,symmetric=0",
        "linear:bits=8,granularity=group,group=8,symmetric=0",
    ],
)
def test_nan_and_inf_are_rejected(spec: str) -> None:
    codec = build_codec(f"{spec}|zstd")
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = _features(4, 16, 0)
        x[1, 3] = bad
        with pytest.raises(CodecError, match=r"NaN / \d+ Inf values; refusing to encode"):
            codec.encode(x)


@pytest.mark.parametrize(
    "spec",
    [
        "linear:bits=4,granularity=group,group=8|zstd",
        "linear:bits=3,symmetric=0|zstd",
        "linear:bits=8,granularity=group,group=8,symmetric=0|zstd",
        "linear:bits=4,granularity=group,group=8,symmetric=0|raw",
    ],
)
def test_truncated_and_corrupted_payloads_are_rejected(spec: str) -> None:
    codec = build_codec(spec)
    x = _features(8, 16, 3)
    payload = codec.encode(x)
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut], x.shape)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload + b"\0", x.shape)
    if spec.endswith("zstd"):
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0x40
        with pytest.raises(CodecError):
            codec.decode(bytes(flipped), x.shape)


def test_corrupt_minimums_and_scales_are_rejected() -> None:
    codec = build_codec("linear:bits=4,granularity=group,group=8,symmetric=0|raw")
    x = _features(4, 16, 5)
    payload = bytearray(codec.encode(x))
    assert _cos(codec.decode(bytes(payload), x.shape), x) > 0.95
    # The last field is "min" (float32 [T, G]); the one before it "scale".
    bad = bytearray(payload)
    bad[-4:] = struct.pack("<f", float("nan"))
    with pytest.raises(CodecError, match="minimums must be finite"):
        codec.decode(bytes(bad), x.shape)
    bad = bytearray(payload)
    n = 4 * 2
    bad[-4 * n - 4 : -4 * n] = struct.pack("<f", -1.0)
    with pytest.raises(CodecError, match="scales must be finite and >= 0"):
        codec.decode(bytes(bad), x.shape)


@pytest.mark.parametrize("spec", ["linear:bits=4,granularity=group,group=8", "linear:bits=2,symmetric=0"])
def test_declared_shape_is_bounded(spec: str) -> None:
    codec = build_codec(f"{spec}|zstd")
    x = _features(8, 16, 4)
    payload = codec.encode(x)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload, shape=(10**6, 16))
    with pytest.raises(PacketTooLargeError):
        codec.decode(payload, shape=(1 << 20, 1 << 16))
    with pytest.raises(PacketTooLargeError):
        codec.decode(payload, shape=x.shape, max_decoded_bytes=64)
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 22))
    with pytest.raises(PacketTooLargeError):
        codec.decode(bomb, shape=x.shape)


# ---- ae with a vector-quantized bottleneck ---------------------------------------------------

DIM = 32
AE = "ae:dim=8,hidden=32"
AE_VQ = "ae:dim=8,hidden=32,vq=16,parts=2"


def _ae_features(n: int, tokens: int = 32, seed: int = 0, rank: int = 4) -> list[torch.Tensor]:
    """Features on a shared low-dimensional non-linear manifold, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, DIM, generator=torch.Generator().manual_seed(1234))
    return [
        torch.nn.functional.gelu(torch.randn(tokens, rank, generator=g) @ basis)
        + 0.05 * torch.randn(tokens, DIM, generator=g)
        for _ in range(n)
    ]


TRAIN = _ae_features(8)
TEST = _ae_features(3, seed=99)
_ARTIFACTS: dict[str, CalibrationArtifact] = {}


def _artifact(spec: str) -> CalibrationArtifact:
    if spec not in _ARTIFACTS:
        _ARTIFACTS[spec] = fit_stages(spec, TRAIN, model="test", model_fingerprint="sha256:" + "0" * 64)
    return _ARTIFACTS[spec]


def _vq_artifact(vq: int) -> tuple[str, CalibrationArtifact]:
    """An artifact for ``ae:...,vq=<vq>,parts=2|raw``: the fitted vq=16 one, codebook cut to `vq` rows."""
    source = _artifact(f"{AE_VQ}|zstd")
    spec = canonical_spec(f"ae:dim=8,hidden=32,vq={vq},parts=2|raw")
    tensors = dict(source.tensors)
    tensors["0.ae.codebook"] = tensors["0.ae.codebook"][:, :vq].contiguous()
    return spec, CalibrationArtifact(spec=spec, tensors=tensors, stages=source.stages)


def test_ae_vq_calibration_round_trip(tmp_path: Path) -> None:
    spec = f"{AE_VQ}|zstd"
    art = _artifact(spec)
    codebook = art.tensors["0.ae.codebook"]
    assert codebook.shape == (2, 16, 4) and codebook.dtype == torch.float32
    art.save(tmp_path / "aevq")
    codec = build_codec(spec, artifact=tmp_path / "aevq")
    assert codec.stages[0].artifact_digest() == art.fingerprint
    mean = torch.cat(TRAIN).mean(0)
    float_ae = build_codec(f"{AE}|int8|zstd", artifact=_artifact(f"{AE}|int8|zstd"))
    for x in TEST:
        payload = codec.encode(x)
        out = codec.decode(payload, shape=x.shape)
        assert out.shape == x.shape and out.dtype == x.dtype
        # Better than the trivial decoder (the calibration mean) by far.
        assert float(((out - x) ** 2).mean()) < 0.5 * float(((mean - x) ** 2).mean())
        assert _cos(out, x) > max(0.8, _cos(mean.expand_as(x), x) + 0.1)
        # Two 4-bit indices per token instead of 8 int8 latents + a scale.
        assert len(payload) < len(float_ae.encode(x)) / 2
    # The codebook is part of the artifact, so of the codec fingerprint.
    edited = dict(art.tensors)
    edited["0.ae.codebook"] = codebook + 1e-3
    other = CalibrationArtifact(spec=art.spec, tensors=edited, stages=art.stages)
    assert build_codec(spec, artifact=other).fingerprint != codec.fingerprint


def test_ae_vq_payload_is_the_packed_indices() -> None:
    spec, art = _vq_artifact(16)
    codec = build_codec(spec, artifact=art)
    x = TEST[0]
    payload = codec.encode(x)
    tokens = x.shape[0]
    table = len(payload) - packed_len(tokens * 2, 4)
    assert table == max_packed_size(codec.layout(CodecContext(tokens, DIM, torch.float32))) - packed_len(
        tokens * 2, 4
    )
    assert table < 16
    # The indices select codewords: every decoded latent is a codebook row.
    stage = codec.stages[0]
    idx = unpack_wide(np.frombuffer(payload[table:], dtype=np.uint8), tokens * 2, 4)
    assert int(idx.max()) < 16
    assert _cos(codec.decode(payload, x.shape), x) > 0.8
    assert stage.outputs == ("q",) and stage.quantizer


@pytest.mark.parametrize(("vq", "bits"), [(12, 4), (300, 9)])
def test_ae_vq_out_of_range_indices_are_rejected(vq: int, bits: int) -> None:
    if vq > 16:  # a codebook larger than the fitted one: pad it with copies
        spec, art = _vq_artifact(16)
        spec = spec.replace("vq=16", f"vq={vq}")
        tensors = dict(art.tensors)
        tensors["0.ae.codebook"] = tensors["0.ae.codebook"].repeat(1, -(-vq // 16), 1)[:, :vq].contiguous()
        art = CalibrationArtifact(spec=spec, tensors=tensors, stages=art.stages)
    else:
        spec, art = _vq_artifact(vq)
    codec = build_codec(spec, artifact=art)
    x = TEST[1]
    payload = bytearray(codec.encode(x))
    n = packed_len(x.shape[0] * 2, bits)
    assert len(payload) - n < 16
    assert _cos(codec.decode(bytes(payload), x.shape), x) > 0.5
    payload[-n:] = b"\xff" * n  # every index 2^bits - 1 >= vq
    with pytest.raises(CodecError, match=f"VQ index {2**bits - 1} is out of range for a codebook of {vq}"):
        codec.decode(bytes(payload), x.shape)


def test_ae_vq_corrupt_and_oversized_payloads_are_rejected() -> None:
    spec = f"{AE_VQ}|zstd"
    codec = build_codec(spec, artifact=_artifact(spec))
    x = TEST[2]
    payload = codec.encode(x)
    for cut in (1, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:cut], x.shape)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload + b"\0", x.shape)
    with pytest.raises(CodecError, match="calibrated on 32-dim features"):
        codec.decode(payload, (x.shape[0], 16))
    with pytest.raises(CodecError, match="calibrated on 32-dim features"):
        codec.encode(x[:, :16])
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload, (10**6, DIM))
    with pytest.raises(PacketTooLargeError):
        codec.decode(payload, (1 << 30, DIM))
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(nan)


def test_ae_vq_artifact_codebook_is_checked() -> None:
    spec = f"{AE_VQ}|zstd"
    art = _artifact(spec)
    for bad in (
        art.tensors["0.ae.codebook"][:, :8],
        art.tensors["0.ae.codebook"].double(),
        torch.full((2, 16, 4), math.nan),
    ):
        tensors = dict(art.tensors)
        tensors["0.ae.codebook"] = bad.contiguous()
        with pytest.raises(CodecError, match="codebook"):
            build_codec(spec, artifact=CalibrationArtifact(spec=art.spec, tensors=tensors))
    tensors = {k: v for k, v in art.tensors.items() if not k.endswith("codebook")}
    with pytest.raises(CodecError, match="lacks tensor 'codebook'"):
        build_codec(spec, artifact=CalibrationArtifact(spec=art.spec, tensors=tensors))


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 10_000))
def test_ae_vq_shapes_and_dtypes_survive(tokens: int, dtype: torch.dtype, seed: int) -> None:
    spec = f"{AE_VQ}|zstd"
    x = _ae_features(1, tokens, seed=seed)[0].to(dtype)
    codec = build_codec(spec, artifact=_artifact(spec))
    payload = codec.encode(x)
    out = codec.decode(payload, shape=x.shape, dtype=dtype)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    assert len(payload) <= packed_len(tokens * 2, 4) + 64  # indices + table + zstd frame
