"""``linear`` / ``int8``: symmetric uniform (absmax) quantization with one scale per token or channel.

    {"x": float [T, D]} ──► scale = max|x| / qmax  (per token: [T], per channel: [D])
                        ──► q = round(x / scale) in [-qmax, qmax],  qmax = 2^(bits-1) - 1
                        ──► {"q": int8 [T, D] (bits=8) | uint8 bit-packed [ceil(T*D*bits/8)],
                             "scale": float32 [T] | [D]}
    decode: x = q * scale, in the requested dtype

Absmax scaling as in LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339),
here with per-token granularity by default since visual tokens differ widely in
norm. Rounding to nearest bounds the error by half a step (scale / 2) per
element. The grid is symmetric (no zero point), so -2^(bits-1) is never used;
below 8 bits codes are offset to unsigned and packed ``bits`` bits each.

``int8`` is ``linear:bits=8,granularity=token``, the default preset's quantizer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.errors import CodecError


@register_stage
class LinearQuant(TensorStage):
    name = "linear"
    params: ClassVar[tuple[Param, ...]] = (
        Param("bits", int, 8, lo=2, hi=8),
        Param("granularity", str, "token", choices=("token", "channel")),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("q", "scale")
    quantizer = True

    bits: int
    granularity: str

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def _reduce_dim(self) -> int:
        # The dimension a scale is shared across: per-token scales reduce over channels.
        return 1 if self.granularity == "token" else 0

    def _packed_len(self, ctx: CodecContext) -> int:
        return -(-ctx.tokens * ctx.dim * self.bits // 8)

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        q = (
            FieldSpec(ctx.shape, (torch.int8,))
            if self.bits == 8
            else FieldSpec((self._packed_len(ctx),), (torch.uint8,))
        )
        scale_len = ctx.tokens if self.granularity == "token" else ctx.dim
        return {"q": q, "scale": FieldSpec((scale_len,), (torch.float32,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = fields["x"].float()
        scale = x.abs().amax(dim=self._reduce_dim) / self.qmax
        # Near float32's max, qmax * scale could round up to inf and the payload would not decode.
        cap = torch.nextafter(torch.tensor(torch.finfo(torch.float32).max / self.qmax), torch.tensor(0.0))
        scale = torch.minimum(scale, cap)
        # An all-zero token/channel has scale 0; divide by 1 instead and its codes stay 0.
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(self._reduce_dim)
        q = torch.round(x / divisor).clamp_(-self.qmax, self.qmax).to(torch.int8)
        return {"q": self._pack(q), "scale": scale}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        scale = fields["scale"]
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError("corrupt payload: quantization scales must be finite and >= 0")
        q = self._unpack(fields["q"], ctx)
        # Not q.abs(): int8 abs(-128) overflows to -128.
        if int(q.min()) < -self.qmax or int(q.max()) > self.qmax:
            raise CodecError(
                f"corrupt payload: {self.bits}-bit codes must lie in [-{self.qmax}, {self.qmax}]"
            )
        x = q.float() * scale.unsqueeze(self._reduce_dim)
        return {"x": x.to(ctx.dtype)}

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q
        codes = (q.reshape(-1, 1).numpy().astype(np.int16) + self.qmax).astype(np.uint8)
        bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : self.bits]
        return torch.from_numpy(np.packbits(bits.reshape(-1), bitorder="little"))

    def _unpack(self, packed: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        if self.bits == 8:
            return packed
        n = ctx.tokens * ctx.dim
        bits = np.unpackbits(packed.numpy(), count=n * self.bits, bitorder="little").reshape(n, self.bits)
        codes = np.packbits(bits, axis=1, bitorder="little").reshape(ctx.shape)
        return torch.from_numpy(codes.astype(np.int16) - self.qmax).to(torch.int8)


@register_stage
class Int8(LinearQuant):
    name = "int8"
    params: ClassVar[tuple[Param, ...]] = ()
    bits = 8
    granularity = "token"
