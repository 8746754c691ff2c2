"""``salient``: send the K most salient visual tokens and where they sit; the Rx fills the rest.

    calibrate:  features [N, T, D] ──per image: rank tokens (as encode)──► the non-salient tokens
                ──mean──► fill vector f [D] (float32, in the artifact)

    encode:  {"x": float [T, D]} ──score s_t──► top-K indices, ascending (original order)
               score=median: s_t = ||x_t - median_t'(x_t')||_2   (per-channel median token)
               score=norm:   s_t = ||x_t||_2
               score=cls:    s_t = the vision tower's CLS attention to patch t (from the Tx half)
             ──► {"x": float [K, D] (the kept tokens),
                  "pos": uint8 [ceil(T/8)] bitmap (bit t set = token t kept, LSB first)
                         | uint8/int16/int32 [K] ascending indices, whichever is smaller for (T, K)}
                  K = min(k, T) (salient:k=N)  or  round(keep * T) (salient:keep=F)
    decode:  x̂ = f broadcast to [T, D];  x̂[kept] = x  ──► {"x": [T, D]}   (every position filled)

Dominant-token selection as in VisionZip (Yang et al., "VisionZip: Longer is Better
but Not Necessary in Vision Language Models", arXiv:2412.04467), which keeps the
tokens the vision encoder concentrates on and merges the rest into a few context
tokens. Here the rest collapse into ONE vector fitted at calibration, so they cost
nothing on the wire, and the decoded features keep all T positions: a language
model trained on T visual tokens still sees T (unlike ``prune``, which shortens the
sequence, this is not a token reducer, so every split accepts it). The default
score, distance from the image's median token, marks what differs from the
background; ``norm`` is ``prune``'s criterion and ``cls`` PruMerge's (computed by
the Tx half, never sent; the stage must come first). Selection is ``prune``'s
(`top_k_indices`: ties go to the earlier token).

Later stages work on the K kept tokens (`output_shape` is [K, D]), and calibration
fits them on this stage's outputs, so ``salient:k=32|pca:k=16|linear:bits=4|zstd``
gets a PCA basis of salient tokens. Positions: a bitmap costs ceil(T/8) bytes, sorted
indices K·w (w = 1 byte for T <= 256, 2 up to 32768, else 4); both depend only on
(T, K), so the layout stays data-independent and the smaller is chosen (T = 256:
indices below K = 32, the 32-byte bitmap from there on). Nothing read is trusted:
the bitmap must hold exactly K set bits and no padding bits, indices must be
strictly ascending and below T (CodecError otherwise); T comes from the declared
shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.codecs.prune import top_k_indices
from shared.codecs.reduce import check_tokens, count_from_ratio
from shared.errors import CodecError


def index_dtype(tokens: int) -> torch.dtype:
    """The narrowest serializable integer dtype holding indices 0..tokens-1."""
    if tokens <= 256:
        return torch.uint8
    return torch.int16 if tokens <= 32_768 else torch.int32


def uses_bitmap(tokens: int, keep: int) -> bool:
    """Whether `keep` of `tokens` positions travel as a bitmap (else as sorted indices)."""
    return -(-tokens // 8) <= keep * index_dtype(tokens).itemsize


@register_stage
class Salient(CalibratedStage, TensorStage):
    name = "salient"
    params: ClassVar[tuple[Param, ...]] = (
        Param("k", int, 0, lo=0, hi=2**31 - 1),
        Param("keep", float, 0.0, lo=0.0, hi=1.0),
        Param("score", str, "median", choices=("median", "norm", "cls")),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("x", "pos")

    k: int
    keep: float
    score: str
    _fill: torch.Tensor

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if (self.k > 0) == (self.keep > 0):
            raise CodecError(
                "stage 'salient' needs exactly one of a token count ('salient:k=32') or a keep "
                f"fraction in (0, 1] ('salient:keep=0.125'), got k={self.k!r}, keep={self.keep!r}"
            )
        self.score_kind = "cls" if self.score == "cls" else ""

    # ---- selection ---------------------------------------------------------------------------
    def kept_tokens(self, tokens: int) -> int:
        """K: how many of `tokens` tokens travel (depends on the count only, never on the data)."""
        check_tokens(self.name, tokens)
        return min(self.k, tokens) if self.k > 0 else count_from_ratio(self.keep, tokens)

    def keep_indices(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Ascending indices of the K most salient tokens of ``x [T, D]``."""
        tokens = int(x.shape[0])
        if self.score == "cls":
            if scores is None:
                raise CodecError(
                    "stage 'salient' with score=cls ranks tokens by the vision tower's CLS attention, "
                    "which the Tx half must provide (Codec.encode(features, scores=...))"
                )
        elif self.score == "median":
            x = x.float()
            scores = torch.linalg.vector_norm(x - x.median(dim=0).values, dim=-1)
        else:
            scores = torch.linalg.vector_norm(x.float(), dim=-1)
        return top_k_indices(self.name, scores.float(), self.kept_tokens(tokens), tokens)

    # ---- calibration -------------------------------------------------------------------------
    def fit(self, samples: Sequence[Fields]) -> dict[str, torch.Tensor]:
        if self.score == "cls":
            # Calibration runs on features alone (`collect_features` does not ask for scores).
            raise CodecError(
                "salient:score=cls cannot be calibrated: splitvlm calibrate collects features without "
                "the tower's CLS scores; use score=median (the default) or score=norm"
            )
        dims = {int(s["x"].shape[-1]) for s in samples}
        if len(dims) != 1:
            raise CodecError(f"salient: calibration needs features of one dim, got dims {sorted(dims)}")
        dim = dims.pop()
        dropped_sum, dropped_count = torch.zeros(dim, dtype=torch.float64), 0
        all_sum, all_count = torch.zeros(dim, dtype=torch.float64), 0
        for sample in samples:
            x = sample["x"].reshape(-1, dim)
            dropped = torch.ones(int(x.shape[0]), dtype=torch.bool)
            dropped[self.keep_indices(x)] = False
            dropped_sum += x[dropped].double().sum(0)
            dropped_count += int(dropped.sum())
            all_sum += x.double().sum(0)
            all_count += int(x.shape[0])
        # When every token is kept no position is ever filled; the mean token is then as good as any.
        fill = dropped_sum / dropped_count if dropped_count else all_sum / all_count
        tensors = {"fill": fill.float().contiguous()}
        self.load_state(tensors, None)
        return tensors

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "fill" not in tensors or tensors["fill"].dim() != 1:
            raise CodecError("calibration artifact for 'salient' lacks a 1-D tensor 'fill'")
        self._fill = get_tensor(self.name, tensors, "fill", (int(tensors["fill"].shape[0]),))

    @property
    def fill(self) -> torch.Tensor:
        """The calibrated vector [D] the decoder puts at every position that was not sent."""
        self.require_calibrated()
        return self._fill.clone()

    def _check_dim(self, ctx: CodecContext) -> None:
        self.require_calibrated()
        if ctx.dim != self._fill.shape[0]:
            raise CodecError(
                f"salient was calibrated on {self._fill.shape[0]}-dim features, these have dim {ctx.dim}"
            )

    # ---- the stage -------------------------------------------------------------------------------
    def output_shape(self, ctx: CodecContext) -> tuple[int, int]:
        """Stages after this one see the kept tokens, [K, D]."""
        return (self.kept_tokens(ctx.tokens), ctx.dim)

    def _positions_spec(self, tokens: int, keep: int) -> FieldSpec:
        if uses_bitmap(tokens, keep):
            return FieldSpec((-(-tokens // 8),), (torch.uint8,))
        return FieldSpec((keep,), (index_dtype(tokens),))

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        self._check_dim(ctx)
        keep = self.kept_tokens(ctx.tokens)
        return {
            "x": FieldSpec((keep, ctx.dim), fields["x"].dtypes),
            "pos": self._positions_spec(ctx.tokens, keep),
        }

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        x = fields["x"]
        kept = self.keep_indices(x, fields.get("scores"))
        tokens = int(x.shape[0])
        if uses_bitmap(tokens, int(kept.numel())):
            mask = np.zeros(tokens, dtype=np.uint8)
            mask[kept.numpy()] = 1
            pos = torch.from_numpy(np.packbits(mask, bitorder="little"))
        else:
            pos = kept.to(index_dtype(tokens))
        return {"x": x[kept].contiguous(), "pos": pos.contiguous()}

    def positions(self, pos: torch.Tensor, tokens: int) -> torch.Tensor:
        """The kept indices (ascending, int64) from a ``pos`` field that matched the layout."""
        keep = self.kept_tokens(tokens)
        if uses_bitmap(tokens, keep):
            bits = np.unpackbits(pos.numpy(), bitorder="little")
            if bits[tokens:].any():
                raise CodecError("corrupt payload: salient position bitmap has bits set past the last token")
            kept = np.flatnonzero(bits[:tokens])
            if kept.size != keep:
                raise CodecError(
                    f"corrupt payload: salient position bitmap marks {kept.size} tokens, expected {keep}"
                )
            return torch.from_numpy(kept).long()
        kept_t = pos.long()
        if kept_t.numel() and (int(kept_t.min()) < 0 or int(kept_t.max()) >= tokens):
            raise CodecError(f"corrupt payload: salient positions must lie in [0, {tokens})")
        if bool((kept_t[1:] <= kept_t[:-1]).any()):
            raise CodecError("corrupt payload: salient positions must be strictly ascending")
        return kept_t

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        kept = self.positions(fields["pos"], ctx.tokens)
        x = self._fill.to(ctx.dtype).expand(ctx.tokens, ctx.dim).clone()
        x[kept] = fields["x"].to(ctx.dtype)
        return {"x": x}
