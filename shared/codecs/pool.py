"""``pool``: 2-D average pooling of the visual tokens over their patch grid.

    {"x": float [T, D]}, T = S*S ──reshape──► [D, S, S] grid
        pool:2         ──avg_pool2d(2x2, stride 2, ragged edge averaged)──► [D, ceil(S/2), ceil(S/2)]
        pool:tokens=N  ──adaptive_avg_pool2d(s = isqrt(N))──────────────────► [D, s, s]  (s <= S)
                       ──flatten, row-major──► {"x": float [T', D]}
    decode: {"x": [T', D]} ──► unchanged (the Rx receives the pooled tokens; nothing is upsampled)

Spatial pooling of visual tokens before the language model, as in LLaVA-OneVision's
bilinear/average token pooling (Li et al., arXiv:2408.03326) and the 2x2 average
pooling of PLLaVA (Xu et al., arXiv:2404.16994); the adaptive form is
``AdaptiveAvgPool2d`` over the patch grid. The grid must be square (its side is
``sqrt(T)``; a CodecError otherwise). ``tokens=N`` asks for at most N tokens: the
side is ``isqrt(N)``, capped at the grid's. A constant grid pools to itself
(exactly when the window sums are exact, as for dyadic values).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from shared.codecs.base import Param, register_stage
from shared.codecs.reduce import TokenReducer, check_tokens
from shared.errors import CodecError


@register_stage
class Pool(TokenReducer):
    name = "pool"
    params: ClassVar[tuple[Param, ...]] = (
        Param("factor", int, 0, lo=0, hi=64),
        Param("tokens", int, 0, lo=0, hi=2**31 - 1),
    )

    factor: int
    tokens: int

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if (self.factor > 0) == (self.tokens > 0):
            raise CodecError(
                "stage 'pool' needs exactly one of a window ('pool:2' for 2x2) or a target token count "
                f"('pool:tokens=144'), got factor={self.factor}, tokens={self.tokens}"
            )

    def grid_side(self, tokens: int) -> int:
        check_tokens(self.name, tokens)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise CodecError(
                f"stage 'pool' needs a square patch grid, but {tokens} tokens are not a square "
                "(the features hold more than one image, or extra tokens such as CLS)"
            )
        return side

    def out_side(self, tokens: int) -> int:
        side = self.grid_side(tokens)
        if self.factor > 0:
            return -(-side // self.factor)
        return min(side, max(1, math.isqrt(self.tokens)))

    def output_tokens(self, tokens: int) -> int:
        return self.out_side(tokens) ** 2

    def reduce(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        side, dim = self.grid_side(int(x.shape[0])), int(x.shape[1])
        grid = x.reshape(side, side, dim).permute(2, 0, 1).unsqueeze(0)  # [1, D, S, S]
        if self.factor > 0:
            window = min(self.factor, side)  # a window wider than the grid averages all of it
            pooled = F.avg_pool2d(grid, window, stride=window, ceil_mode=True, count_include_pad=False)
        else:
            pooled = F.adaptive_avg_pool2d(grid, self.out_side(int(x.shape[0])))
        return pooled[0].permute(1, 2, 0).reshape(-1, dim)
