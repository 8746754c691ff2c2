"""Token reducers: tensor stages that send fewer visual tokens than the vision encoder made.

    encode: {"x": float [T, D]} ──reduce──► {"x": float [T', D]},  T' = output_tokens(T) <= T
    decode: {"x": float [T', D]} ──────────► {"x": float [T', D]}   (nothing is restored)

The Rx receives the reduced tokens and builds its prompt for T' of them, so the
decoded shape differs from the encoder's: `Codec.decoded_shape` gives it without
running, and the packet header declares it. T' depends only on T and the stage's
parameters (never on the data), so every tensor stage after a reducer, and the
decoder, work with the exact shape [T', D] and keep their size bounds.

Reducers work on float features and come first in a pipeline: before quantizers,
casts and every other tensor stage, and before byte stages. A split adapter must
declare ``CodecSupport.token_reduction`` for the Tx/Rx to accept one.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from shared.codecs.base import FLOAT_DTYPES, CodecContext, Fields, FieldSpec, Layout, TensorStage
from shared.errors import CodecError


class TokenReducer(TensorStage):
    """A tensor stage mapping ``x [T, D]`` to ``x [output_tokens(T), D]``; decode is the identity.

    `layout` and `decode` receive the context of the *decoded* (reduced) features;
    `encode` receives that of its input.

    A reducer whose `score_kind` is set ranks tokens by per-token scores that the Tx
    half computes (e.g. ``"cls"``: the vision tower's CLS attention); `Codec.encode`
    then passes them as the ``scores`` field (``float [T]``). Scores are never sent.
    """

    score_kind: str = ""

    @abstractmethod
    def output_tokens(self, tokens: int) -> int:
        """How many tokens `encode` returns for `tokens` input tokens (CodecError if it cannot)."""

    @abstractmethod
    def reduce(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[T, D]`` (and ``scores [T]`` when `score_kind`) -> float32 ``[output_tokens(T), D]``."""

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        return {"x": FieldSpec(ctx.shape, fields["x"].dtypes if "x" in fields else FLOAT_DTYPES)}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = fields["x"]
        tokens = int(x.shape[0])
        expected = self.output_tokens(tokens)
        if expected == tokens:
            return {"x": x}
        scores = fields.get("scores")
        if self.score_kind and scores is None:
            raise CodecError(
                f"stage {self.name!r} ranks tokens by {self.score_kind!r} scores, which the Tx half must "
                "provide (Codec.encode(features, scores=...))"
            )
        y = self.reduce(x.float(), scores)
        if tuple(y.shape) != (expected, int(x.shape[1])):
            raise CodecError(
                f"stage {self.name!r} produced shape {tuple(y.shape)}, expected {(expected, x.shape[1])}"
            )
        return {"x": y.to(x.dtype)}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        return {"x": fields["x"]}


def count_from_ratio(ratio: float, tokens: int) -> int:
    """``round(ratio * tokens)`` (halves up), at least 1 and at most `tokens`."""
    return min(tokens, max(1, math.floor(ratio * tokens + 0.5)))


def check_tokens(stage: str, tokens: int) -> None:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise CodecError(f"stage {stage!r}: the token count must be a positive int, got {tokens!r}")
