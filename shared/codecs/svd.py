"""``svd``: per-image truncated SVD of the token matrix; no calibration.

    encode:  {"x": float [T, D]} ──SVD──► U [T, r'], S [r'], V [D, r']   (r' = min(r, T, D))
             ──► {"x": float32 [T + D, r'] = [ U·S ; V ]}   (rows 0..T-1: U·S, rows T..: V)
    decode:  {"x": [T + D, r']} ──► x̂ = (U·S) Vᵀ ──► {"x": [T, D]}

The Eckart-Young theorem (1936): the rank-r truncation of the SVD is the best
rank-r approximation in Frobenius norm. The factors travel stacked in one
``x`` field so that a following quantizer (``fp16``, ``int8``: one scale per
row, i.e. per factor row) applies to both; ``r' (T + D)`` numbers are sent
instead of ``T D``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage


@register_stage
class Svd(TensorStage):
    name = "svd"
    params: ClassVar[tuple[Param, ...]] = (Param("r", int, 16, lo=1, hi=65_536),)

    r: int

    def rank(self, ctx: CodecContext) -> int:
        return min(self.r, ctx.tokens, ctx.dim)

    def output_shape(self, ctx: CodecContext) -> tuple[int, int]:
        """Stages after this one see ``x`` as [T + D, r']."""
        return (ctx.tokens + ctx.dim, self.rank(ctx))

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        return {"x": FieldSpec((ctx.tokens + ctx.dim, self.rank(ctx)), (torch.float32,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        r = self.rank(ctx)
        u, s, vh = torch.linalg.svd(fields["x"].double(), full_matrices=False)
        us = u[:, :r] * s[:r]
        v = vh[:r].T
        return {"x": torch.cat([us, v]).float().contiguous()}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = fields["x"].float()
        us, v = x[: ctx.tokens], x[ctx.tokens :]
        return {"x": (us @ v.T).to(ctx.dtype)}
