"""``linear`` / ``int8``: uniform quantization with one scale per token, channel or group of channels.

    {"x": float [T, D]} ──► per scale group (token: a row [T], channel: a column [D],
                            group: G = D / group consecutive channels of a token [T, G])
      symmetric=1 (default, absmax, no zero point):
                        ──► scale = max|x| / qmax,  q = round(x / scale) in [-qmax, qmax],
                            qmax = 2^(bits-1) - 1
                        ──► {"q": int8 [T, D] (bits=8) | uint8 bit-packed [ceil(T*D*bits/8)],
                             "scale": float32 (float16 with scale=fp16) [T] | [D] | [T, G]}
        decode: x = q * scale
      symmetric=0 (min/max, asymmetric, zero point):
                        ──► scale = (max x - min x) / (2^bits - 1)
                            min = min x, or -round(-min x / scale) * scale if min x < 0 < max x
                            q = round((x - min) / scale) clamped to [0, 2^bits - 1]
                        ──► {"q": uint8 [T, D] (bits=8) | uint8 bit-packed [ceil(T*D*bits/8)],
                             "scale": float32 [T] | [D] | [T, G],  "min": float32, same shape}
        decode: x = min + q * scale
    decode returns the requested dtype.

Absmax scaling as in LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339),
here with per-token granularity by default since visual tokens differ widely in
norm. Rounding to nearest bounds the error by half a step (scale / 2) per
element. The symmetric grid has no zero point, so -2^(bits-1) is never used;
below 8 bits codes are offset to unsigned and packed ``bits`` bits each.

``granularity=group,group=N`` gives each token one scale per N consecutive
channels (N must divide D), as in group-wise weight quantization (GPTQ, AWQ):
one outlier channel then coarsens only its own group. ``symmetric=0`` spends
all 2^bits levels on the group's [min, max] range (affine quantization with a
zero point, Jacob et al., 2018, arXiv:1712.05877): better for one-sided data
such as post-GELU activations. The zero point is sent as the grid's float
offset ``min``; where the range holds 0 it is snapped to a whole number of
steps so that 0 is a code (zeros come back to within float32 rounding of
``min``, near-zero values cheaply), which
moves each end by at most half a step, so the error stays within half a step
(plus float32 rounding). Both parameters are keyword-only and left out of the
canonical spec at their defaults, so existing specs keep their fingerprints.

``scale=fp16`` (symmetric grid only) sends the scales as float16: each is rounded
*up* to a float16 value before the codes are computed, so the error bound (half
of the sent step) still holds and no code clips, at half the scales' bytes. It
matters at low rates: 32 kept tokens × 4 bytes of scale are a third of a
``salient:k=32|pca:k=16|linear:bits=4`` payload. Scales beyond float16's range
(max |x| > 65504 · qmax) are capped and those codes clip.

``int8`` is ``linear:bits=8,granularity=token``, the default preset's quantizer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.bitpack import pack_bits, packed_len, unpack_bits
from shared.errors import CodecError

_DEFAULT_GROUP = 32
_F32_MAX = torch.finfo(torch.float32).max


@register_stage
class LinearQuant(TensorStage):
    name = "linear"
    params: ClassVar[tuple[Param, ...]] = (
        Param("bits", int, 8, lo=2, hi=8),
        Param("granularity", str, "token", choices=("token", "channel", "group")),
        Param("group", int, _DEFAULT_GROUP, lo=1, hi=65_536, keyword_only=True),
        Param("symmetric", int, 1, lo=0, hi=1, keyword_only=True),
        Param("scale", str, "fp32", choices=("fp32", "fp16"), keyword_only=True),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("q", "scale")
    quantizer = True

    bits: int
    granularity: str
    group: int
    symmetric: int
    scale: str  # the scales' wire dtype

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if self.group != _DEFAULT_GROUP and self.granularity != "group":
            raise CodecError(
                f"stage {self.name!r}: group={self.group} applies only to granularity=group, "
                f"not granularity={self.granularity}"
            )
        if self.scale == "fp16" and not self.symmetric:
            raise CodecError(f"stage {self.name!r}: scale=fp16 applies only to the symmetric grid")
        if not self.symmetric:
            # The asymmetric grid also sends each scale group's minimum. (Set on the
            # instance: the pipeline reads `outputs` per stage.)
            self.__dict__["outputs"] = ("q", "scale", "min")

    @property
    def spec(self) -> str:
        if not self.params:  # int8
            return super().spec
        # group and symmetric are spelled only where they matter, so specs from before
        # they existed keep their canonical form (and fingerprint).
        spec = f"{self.name}:bits={self.bits},granularity={self.granularity}"
        if self.granularity == "group":
            spec += f",group={self.group}"
        spec += "" if self.symmetric else ",symmetric=0"
        return spec + ("" if self.scale == "fp32" else f",scale={self.scale}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def levels(self) -> int:
        """Number of codes the asymmetric grid uses: 2^bits."""
        return 1 << self.bits

    @property
    def _reduce_dim(self) -> int:
        # The dimension a scale is shared across: per-token scales reduce over channels.
        return 1 if self.granularity == "token" else 0

    def _packed_len(self, ctx: CodecContext) -> int:
        return -(-ctx.tokens * ctx.dim * self.bits // 8)

    def _scale_shape(self, ctx: CodecContext) -> tuple[int, ...]:
        if self.granularity == "token":
            return (ctx.tokens,)
        if self.granularity == "channel":
            return (ctx.dim,)
        if ctx.dim % self.group:
            raise CodecError(
                f"stage {self.spec!r}: the feature dim {ctx.dim} is not a multiple of group={self.group}; "
                "pick a group size that divides it"
            )
        return (ctx.tokens, ctx.dim // self.group)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] viewed so that every scale group is one row of the last dim: [S..., n]."""
        if self.granularity == "token":
            return x
        if self.granularity == "channel":
            return x.T
        return x.reshape(x.shape[0], -1, self.group)

    def _ungrouped(self, y: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        return y.T if self.granularity == "channel" else y.reshape(ctx.shape)

    @property
    def _scale_dtype(self) -> torch.dtype:
        return torch.float16 if self.scale == "fp16" else torch.float32

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        scale = FieldSpec(self._scale_shape(ctx), (self._scale_dtype,))
        if not self.symmetric:
            q = (
                FieldSpec(ctx.shape, (torch.uint8,))
                if self.bits == 8
                else FieldSpec((packed_len(ctx.tokens * ctx.dim, self.bits),), (torch.uint8,))
            )
            return {"q": q, "scale": scale, "min": scale}
        q = (
            FieldSpec(ctx.shape, (torch.int8,))
            if self.bits == 8
            else FieldSpec((self._packed_len(ctx),), (torch.uint8,))
        )
        return {"q": q, "scale": scale}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._scale_shape(ctx)  # group must divide D
        if not self.symmetric:
            return self._encode_asymmetric(fields["x"], ctx)
        x = self._grouped(fields["x"].float())
        scale = x.abs().amax(dim=-1) / self.qmax
        # Near float32's max, qmax * scale could round up to inf and the payload would not decode.
        cap = torch.nextafter(torch.tensor(_F32_MAX / self.qmax), torch.tensor(0.0))
        scale = torch.minimum(scale, cap)
        if self.scale == "fp16":
            scale = _round_up_to_fp16(scale)
        # An all-zero token/channel/group has scale 0; divide by 1 instead and its codes stay 0.
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        q = torch.round(x / divisor).clamp_(-self.qmax, self.qmax).to(torch.int8)
        sent = scale.to(self._scale_dtype).contiguous()
        return {"q": self._pack(self._ungrouped(q, ctx).contiguous()), "scale": sent}

    def _encode_asymmetric(self, features: torch.Tensor, ctx: CodecContext) -> Fields:
        # float64 throughout: max - min of float32 values can exceed float32's range.
        x = self._grouped(features.double())
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)
        step = (hi - lo) / (self.levels - 1)
        scale = step.float()
        # Round the sent step up where float32 rounded it down, so min + (2^bits - 1) * scale
        # still reaches max (error stays <= scale / 2).
        scale = torch.where(
            scale.double() < step, torch.nextafter(scale, torch.full_like(scale, np.inf)), scale
        )
        # Where the range holds 0, snap the grid so that 0 is a code (the integer zero point
        # zp = round(-min / scale)): exact zeros, and near-zero values (most of a feature map)
        # keep a small error. The ends stay within half a step of the grid (then clamped).
        zero_point = torch.round(-lo / scale.double())
        snapped = torch.where((lo < 0) & (hi > 0), -zero_point * scale.double(), lo)
        # Where not snapped, exact: the inputs are float32/16/bf16. (The clamp only matters
        # for ranges near float32's limits, which snapping could push past them.)
        lo32 = snapped.clamp(-_F32_MAX, _F32_MAX).float()
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).double().unsqueeze(-1)
        q = torch.round((x - lo32.double().unsqueeze(-1)) / divisor).clamp_(0, self.levels - 1)
        codes = self._ungrouped(q.to(torch.uint8), ctx).contiguous()
        packed = codes if self.bits == 8 else torch.from_numpy(pack_bits(codes.numpy(), self.bits))
        return {"q": packed, "scale": scale.contiguous(), "min": lo32.contiguous()}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        scale = fields["scale"].float()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError("corrupt payload: quantization scales must be finite and >= 0")
        if not self.symmetric:
            return self._decode_asymmetric(fields["q"], scale, fields["min"], ctx)
        q = self._unpack(fields["q"], ctx)
        # Not q.abs(): int8 abs(-128) overflows to -128.
        if int(q.min()) < -self.qmax or int(q.max()) > self.qmax:
            raise CodecError(
                f"corrupt payload: {self.bits}-bit codes must lie in [-{self.qmax}, {self.qmax}]"
            )
        x = self._ungrouped(self._grouped(q).float() * scale.unsqueeze(-1), ctx)
        return {"x": x.to(ctx.dtype)}

    def _decode_asymmetric(
        self, packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, ctx: CodecContext
    ) -> Fields:
        if not bool(torch.isfinite(lo).all()):
            raise CodecError("corrupt payload: quantization minimums must be finite")
        if self.bits == 8:
            codes = packed
        else:
            n = ctx.tokens * ctx.dim
            codes = torch.from_numpy(unpack_bits(packed.numpy(), n, self.bits).reshape(ctx.shape))
        # Every code in [0, 2^bits - 1] is valid: the field's width bounds them.
        y = lo.double().unsqueeze(-1) + self._grouped(codes).double() * scale.double().unsqueeze(-1)
        # A range's end code may lie half a step outside the data, hence possibly outside the
        # dtype; the features were inside it, so clamping there only brings the value closer.
        limit = torch.finfo(ctx.dtype).max
        x = self._ungrouped(y.clamp_(-limit, limit), ctx)
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
    group = _DEFAULT_GROUP
    symmetric = 1
    scale = "fp32"


def _round_up_to_fp16(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales -> float16 values (held in float32) >= them, so no code needs to clip.

    Scales above float16's largest value are capped there (the few codes of such tokens clip
    to ±qmax); below its smallest subnormal they round up to it (codes stay in range).
    """
    fp16_max = torch.finfo(torch.float16).max
    capped = scale.clamp(max=fp16_max)
    half = capped.half()
    below = half.float() < capped
    half = torch.where(below, torch.nextafter(half, torch.full_like(half, fp16_max)), half)
    return half.float()
