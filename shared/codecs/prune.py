"""``prune``: keep the most important visual tokens, drop the rest (original order kept).

    {"x": float [T, D]} ──score = ||x_t||_2 (or the Tx's CLS attention)──► top-K indices
                        ──sort (original order)──► {"x": float [K, D]}
                         K = round(ratio * T)  (prune:0.5)   or   min(k, T)  (prune:k=N)
    decode: {"x": [K, D]} ──► unchanged (the Rx receives K tokens)

Importance pruning as in the training-free token-pruning line of work for VLMs
(e.g. FastV, Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024;
PruMerge, Shang et al., arXiv:2403.15388, which ranks LLaVA's visual tokens by
the vision tower's CLS attention). The default score is the feature L2 norm,
which needs nothing but the features; ties go to the earlier token. The kept
tokens stay in their original order, so the Rx's positions stay monotone.

``score=cls`` ranks by the CLS token's attention to each patch in the layer the
features are taken from (PruMerge's criterion); the Tx half computes those scores
(`TxHalf.token_scores`) and they are never sent. It must be the codec's first
stage, since the scores describe the vision encoder's own tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shared.codecs.base import Param, register_stage
from shared.codecs.reduce import TokenReducer, check_tokens, count_from_ratio
from shared.errors import CodecError


@register_stage
class Prune(TokenReducer):
    name = "prune"
    params: ClassVar[tuple[Param, ...]] = (
        Param("ratio", float, 0.0, lo=0.0, hi=1.0),
        Param("k", int, 0, lo=0, hi=2**31 - 1),
        Param("score", str, "norm", choices=("norm", "cls")),
    )

    ratio: float
    k: int
    score: str

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if (self.ratio > 0) == (self.k > 0):
            raise CodecError(
                "stage 'prune' needs exactly one of a keep-ratio in (0, 1] ('prune:0.5') "
                f"or a token count ('prune:k=64'), got ratio={self.ratio!r}, k={self.k!r}"
            )
        self.score_kind = "cls" if self.score == "cls" else ""

    def output_tokens(self, tokens: int) -> int:
        check_tokens(self.name, tokens)
        return min(self.k, tokens) if self.k > 0 else count_from_ratio(self.ratio, tokens)

    def reduce(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        return x[self.keep_indices(x, scores)]

    def keep_indices(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (ascending) of the tokens kept from ``x [T, D]`` (by `scores [T]` when given)."""
        keep = self.output_tokens(int(x.shape[0]))
        if scores is None:
            scores = torch.linalg.vector_norm(x.float(), dim=-1)
        return top_k_indices(self.name, scores, keep, int(x.shape[0]))


def top_k_indices(stage: str, scores: torch.Tensor, keep: int, tokens: int) -> torch.Tensor:
    """Ascending indices of the `keep` highest of `scores` (``[tokens]``); ties go to the earlier token.

    Shared by the stages that rank tokens (``prune``, ``salient``); CodecError unless `scores`
    holds `tokens` finite values (they may come from the Tx half, e.g. CLS attention).
    """
    if tuple(scores.shape) != (tokens,) or not bool(torch.isfinite(scores).all()):
        raise CodecError(
            f"stage {stage!r}: scores must be {tokens} finite values (one per token), "
            f"got shape {tuple(scores.shape)}"
        )
    order = torch.argsort(scores, descending=True, stable=True)
    return torch.sort(order[:keep]).values
