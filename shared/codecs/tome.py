"""``tome``: merge similar visual tokens by bipartite soft matching (ToMe).

    {"x": float [T, D]}, sizes = 1
      round: A = tokens 0, 2, 4, ...   B = tokens 1, 3, 5, ...   (in current order)
             sim = cos(A, B) ──► each a in A picks its most similar b in B
             the r best-matched a's merge into their b:  b <- (s_b b + s_a a) / (s_b + s_a),
                                                         s_b <- s_b + s_a
             survivors = unmatched A + all B, in the order of their original positions
      repeat until T' tokens remain  ──► {"x": float [T', D]}
    decode: {"x": [T', D]} ──► unchanged (the Rx receives T' merged tokens)

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461).
Merges are size-weighted averages, so the size-weighted mean of the tokens is
preserved exactly (up to float rounding); the sizes are not sent (the Rx's
attention does not use them). A merged token takes the position of its B
representative, so tokens stay in their original order. One ToMe round can merge
at most half the tokens; ``tome:keep=0.25`` runs as many rounds as needed.

    tome:r=K      merge K tokens away (at most T - 1):  T' = T - min(K, T - 1)
    tome:keep=p   keep round(p * T) tokens (at least 1)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.codecs.base import Param, register_stage
from shared.codecs.reduce import TokenReducer, check_tokens, count_from_ratio
from shared.errors import CodecError


def bipartite_merge(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge float ``x [T, D]`` down to ``target`` tokens; returns (tokens, sizes), order kept."""
    sums = x.float().clone()  # size-weighted sums; tokens are sums / sizes
    sizes = torch.ones(x.shape[0], dtype=torch.float64)
    positions = torch.arange(x.shape[0])
    while sums.shape[0] > target:
        n = sums.shape[0]
        r = min(n // 2, n - target)
        tokens = sums / sizes.unsqueeze(1).to(sums.dtype)
        metric = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = metric[0::2], metric[1::2]
        best, match = (a @ b.T).max(dim=-1)
        order = torch.argsort(best, descending=True, stable=True)
        src, kept = order[:r], order[r:]
        a_index = torch.arange(0, n, 2)
        b_index = torch.arange(1, n, 2)
        src_rows = a_index[src]
        b_sums = sums[b_index].index_add(0, match[src], sums[src_rows])
        b_sizes = sizes[b_index].index_add(0, match[src], sizes[src_rows])
        rows = a_index[kept]
        sums = torch.cat([sums[rows], b_sums])
        sizes = torch.cat([sizes[rows], b_sizes])
        positions = torch.cat([positions[rows], positions[b_index]])
        restore = torch.argsort(positions)
        sums, sizes, positions = sums[restore], sizes[restore], positions[restore]
    return sums / sizes.unsqueeze(1).to(sums.dtype), sizes


@register_stage
class ToMe(TokenReducer):
    name = "tome"
    params: ClassVar[tuple[Param, ...]] = (
        Param("r", int, 0, lo=0, hi=2**31 - 1),
        Param("keep", float, 0.0, lo=0.0, hi=1.0),
    )

    r: int
    keep: float

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if (self.r > 0) == (self.keep > 0):
            raise CodecError(
                "stage 'tome' needs exactly one of a merge count ('tome:r=16') or a keep-ratio in (0, 1] "
                f"('tome:keep=0.5'), got r={self.r}, keep={self.keep!r}"
            )

    def output_tokens(self, tokens: int) -> int:
        check_tokens(self.name, tokens)
        if self.r > 0:
            return tokens - min(self.r, tokens - 1)
        return count_from_ratio(self.keep, tokens)

    def reduce(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        merged, _ = bipartite_merge(x, self.output_tokens(int(x.shape[0])))
        return merged
