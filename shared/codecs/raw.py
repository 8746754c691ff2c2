"""``raw``: keep the features as they are, in their own dtype.

    {"x": float32|float16|bfloat16 [T, D]} ──► unchanged ──► serialize

The exact (lossless) representation: with no other tensor stage the payload
holds the input's bits, so decode is bit-identical in the input's dtype. The
stage only makes that intent explicit in a spec ("raw|zstd").
"""

from __future__ import annotations

from typing import ClassVar

from shared.codecs.base import CodecContext, Fields, Layout, TensorStage, register_stage


@register_stage
class Raw(TensorStage):
    name = "raw"
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        return {}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        return {}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        return {}
