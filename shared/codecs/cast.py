"""``fp16`` / ``bf16``: store the features in a 16-bit float format.

    {"x": float32 [T, D]} ──cast──► {"x": float16|bfloat16 [T, D]} ──► serialize
    decode: {"x": 16-bit [T, D]} ──cast──► {"x": requested dtype [T, D]}

float16 keeps 11 significant bits but overflows above 65504; bfloat16 keeps the
float32 range with 8 significant bits. Input already in the target dtype passes
through exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.codecs.base import (
    CodecContext,
    Fields,
    FieldSpec,
    Layout,
    TensorStage,
    dtype_name,
    register_stage,
)
from shared.errors import CodecError


class _Cast(TensorStage):
    target: ClassVar[torch.dtype]
    # Casting drops precision like quantizing does; stacking it with a quantizer is a mistake.
    quantizer = True

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        return {"x": FieldSpec(ctx.shape, (self.target,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = fields["x"]
        y = x.to(self.target)
        # Only float16 can overflow; inf on the wire would be rejected by the decoder anyway.
        overflow = int((~torch.isfinite(y)).sum())
        if overflow:
            limit = torch.finfo(self.target).max
            raise CodecError(
                f"{overflow} feature values exceed the {dtype_name(self.target)} range (|x| <= {limit:g}, "
                f"found max |x| = {float(x.abs().max()):g}); use 'bf16' or a lossless codec"
            )
        return {"x": y}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        return {"x": fields["x"].to(ctx.dtype)}


@register_stage
class Fp16(_Cast):
    name = "fp16"
    target = torch.float16


@register_stage
class Bf16(_Cast):
    name = "bf16"
    target = torch.bfloat16
