"""The mu-law (logarithmic) quantizer: bounds, packing, and where it beats the uniform grid."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codecs import build_codec
from shared.errors import CodecError, PacketTooLargeError


def _features(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed, like vision-tower activations: most values small, a few large.
    return torch.randn(tokens, dim, generator=g) ** 3


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    dim=st.integers(1, 40),
    bits=st.integers(2, 8),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_shapes_dtypes_and_range_survive(
    tokens: int, dim: int, bits: int, seed: int, dtype: torch.dtype
) -> None:
    x = _features(tokens, dim, seed).to(dtype)
    codec = build_codec(f"mulaw:bits={bits}|zstd")
    out = codec.decode(codec.encode(x), shape=x.shape, dtype=dtype)
    assert out.shape == x.shape and out.dtype == dtype
    # Never outside the token's own range (companding maps [-1, 1] onto itself).
    peak = x.float().abs().amax(dim=1, keepdim=True)
    assert bool((out.float().abs() <= peak * (1 + 1e-2) + 1e-6).all())


def test_payload_is_bit_packed() -> None:
    x = _features(64, 64, 1)
    for bits in (2, 4, 6):
        codec = build_codec(f"mulaw:bits={bits}|raw")
        # codes + one fp32 scale per token + the field table
        assert len(codec.encode(x)) <= 64 * 64 * bits // 8 + 64 * 4 + 128


def test_beats_uniform_4_bit_on_heavy_tailed_features() -> None:
    x = _features(256, 128, 2)

    def mse(spec: str) -> float:
        codec = build_codec(spec)
        return float(((codec.decode(codec.encode(x), shape=x.shape) - x) ** 2).mean())

    assert mse("mulaw:bits=4|zstd") < mse("linear:bits=4|zstd")


def test_corrupt_codes_and_bombs_are_rejected() -> None:
    x = _features(8, 8, 3)
    codec = build_codec("mulaw:bits=3|raw")
    payload = codec.encode(x)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload[:-3], shape=x.shape)
    with pytest.raises((CodecError, PacketTooLargeError)):
        codec.decode(payload, shape=(10**6, 8))
    with pytest.raises(CodecError):
        codec.encode(torch.full((2, 2), float("nan")))
