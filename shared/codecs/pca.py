"""``pca``: project each token onto the top-k principal components fitted on calibration features.

    calibrate:  features [N, D] ──mean μ [D]──► centred ──SVD──► basis B [k, D] (top-k right
                singular vectors, orthonormal rows)

    encode:  {"x": float [T, D]} ──► z = (x - μ) Bᵀ ──► {"x": float32 [T, k]}
    decode:  {"x": float32 [T, k]} ──► x̂ = z W + b,  W = B [k, D], b = μ ──► {"x": [T, D]}

Principal component analysis (Pearson, 1901; Hotelling, 1933) as a transform
codec: the Karhunen-Loève transform, optimal in mean squared error among linear
projections to k dimensions. The decoder is a pure affine map, exposed as
`linear_decoder()` with the dense coefficients as `compact()`, so it can be
folded into a following ``nn.Linear`` (`shared.codecs.fold`) instead of being
run separately. With ``k = D`` the transform is orthonormal and reconstruction
is exact up to float rounding.

Later stages see a ``[T, k]`` field (e.g. ``pca:k=16|int8|zstd`` quantizes the
16-dim coefficients per token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.codecs.fold import CompactCode
from shared.errors import CodecError


@register_stage
class Pca(CalibratedStage, TensorStage):
    name = "pca"
    params: ClassVar[tuple[Param, ...]] = (Param("k", int, 64, lo=1, hi=65_536),)

    k: int
    _mean: torch.Tensor
    _basis: torch.Tensor

    def fit(self, samples: Sequence[Fields]) -> dict[str, torch.Tensor]:
        x = torch.cat([s["x"].reshape(-1, s["x"].shape[-1]).double() for s in samples])
        n, dim = x.shape
        if self.k > dim:
            raise CodecError(f"pca:k={self.k} needs k <= the feature dim {dim}")
        if n < 2:
            raise CodecError(f"pca needs at least 2 calibration tokens, got {n}")
        mean = x.mean(0)
        # The reduced SVD when there are more tokens than dims: the full one would build an n x n U
        # (34 GB for 65,536 calibration tokens). With fewer tokens, the full V pads the basis to k.
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=n < dim)
        tensors = {"mean": mean.float(), "basis": vh[: self.k].float().contiguous()}
        self.load_state(tensors, None)
        return tensors

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "basis" not in tensors or tensors["basis"].dim() != 2:
            raise CodecError("calibration artifact for 'pca' lacks a 2-D tensor 'basis'")
        dim = int(tensors["basis"].shape[1])
        self._basis = get_tensor(self.name, tensors, "basis", (self.k, dim))
        self._mean = get_tensor(self.name, tensors, "mean", (dim,))

    def linear_decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [k, D], b [D]) with decode(z) = z @ W + b, for folding into the next Linear."""
        self.require_calibrated()
        return self._basis.clone(), self._mean.clone()

    def _check_dim(self, ctx: CodecContext) -> None:
        self.require_calibrated()
        if ctx.dim != self._basis.shape[1]:
            raise CodecError(
                f"pca was calibrated on {self._basis.shape[1]}-dim features, these have dim {ctx.dim}"
            )

    def output_shape(self, ctx: CodecContext) -> tuple[int, int]:
        """Stages after this one see ``x`` as [T, k]."""
        return (ctx.tokens, self.k)

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        self._check_dim(ctx)
        return {"x": FieldSpec((ctx.tokens, self.k), (torch.float32,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        z = (fields["x"].float() - self._mean) @ self._basis.T
        return {"x": z.contiguous()}

    def compact(self, fields: Fields, ctx: CodecContext) -> CompactCode:
        """The dense coefficients z [T, k] that `decode` maps through `linear_decoder()`."""
        self._check_dim(ctx)
        return CompactCode(fields["x"].float())

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = self.compact(fields, ctx).apply(self._basis, self._mean)
        return {"x": x.to(ctx.dtype)}
