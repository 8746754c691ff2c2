"""``mulaw``: logarithmic (μ-law companded) quantization, one scale per token.

    {"x": float [T, D]} ──► s = max|x| per token, y = x / s in [-1, 1]
                        ──► c = sign(y) · ln(1 + μ|y|) / ln(1 + μ)          (compress)
                        ──► q = round(c · qmax) in [-qmax, qmax], qmax = 2^(bits-1) - 1
                        ──► {"q": uint8 bit-packed [ceil(T*D*bits/8)], "scale": float32 [T]}
    decode: y = sign(c) · ((1 + μ)^|c| - 1) / μ,  x = y · s                (expand)

μ-law companding (ITU-T G.711, 1972) spends more levels near zero, where most
vision-tower activations sit, and fewer on the rare large values: at low bit
widths it keeps more of a token's energy than the uniform grid of ``linear``.
The default μ = 10, not telephony's 255: on heavy-tailed features at 4 bits the
error is 2.6× lower than ``linear:bits=4`` at μ = 10, and no better at μ = 255,
which spends too many levels next to zero.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.bitpack import pack_bits, packed_len, unpack_bits
from shared.errors import CodecError


@register_stage
class MuLawQuant(TensorStage):
    name = "mulaw"
    params: ClassVar[tuple[Param, ...]] = (
        Param("bits", int, 4, lo=2, hi=8),
        Param("mu", float, 10.0, lo=1.0, hi=1e6),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("q", "scale")
    quantizer = True

    bits: int
    mu: float

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        return {
            "q": FieldSpec((packed_len(ctx.tokens * ctx.dim, self.bits),), (torch.uint8,)),
            "scale": FieldSpec((ctx.tokens,), (torch.float32,)),
        }

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = fields["x"].double()
        scale = x.abs().amax(dim=1)
        y = x / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        c = torch.sign(y) * torch.log1p(self.mu * y.abs()) / math.log1p(self.mu)
        q = torch.round(c * self.qmax).clamp_(-self.qmax, self.qmax).to(torch.int16)
        codes = (q + self.qmax).numpy().astype(np.uint8)
        return {"q": torch.from_numpy(pack_bits(codes, self.bits)), "scale": scale.float()}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        scale = fields["scale"]
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError("corrupt payload: mu-law scales must be finite and >= 0")
        codes = unpack_bits(fields["q"].numpy(), ctx.tokens * ctx.dim, self.bits)
        if int(codes.max(initial=0)) > 2 * self.qmax:
            raise CodecError(f"corrupt payload: {self.bits}-bit mu-law codes must be <= {2 * self.qmax}")
        c = (torch.from_numpy(codes.astype(np.float64)) - self.qmax).reshape(ctx.shape) / self.qmax
        y = torch.sign(c) * torch.expm1(c.abs() * math.log1p(self.mu)) / self.mu
        return {"x": (y * scale.double().unsqueeze(1)).to(ctx.dtype)}
