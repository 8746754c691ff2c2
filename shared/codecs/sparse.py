"""``sparse``: sparse coding over a dictionary learned on calibration features (k atoms per token).

    calibrate:  features [N, D] ──mean μ──► centred ──dictionary learning──► atoms A [n_atoms, D]
                (unit-norm rows)

    encode:  {"x": float [T, D]} ──OMP, k non-zeros per token──►
             {"x": float32 [T, k] (coefficients),  "idx": int16 [T, k] (atom indices, ascending)}
    decode:  x̂[t] = μ + Σ_j x[t, j] · A[idx[t, j]] ──► {"x": [T, D]}

Dictionary learning (Mairal et al., "Online dictionary learning for sparse
coding", ICML 2009) with orthogonal matching pursuit (Pati et al., 1993) as
the sparse coder, both from scikit-learn. The coefficients travel as ``x`` so a
following quantizer applies to them (``sparse:atoms=256,k=8|int8|zstd``); the
indices are checked against the dictionary size before use.

The decoder is linear in the coefficients: `linear_decoder()` is (A, μ) and
`compact()` the sparse code (coefficients + indices), so the Rx can fold A into
the projector's first Linear and gather k folded atoms per token
(`shared.codecs.fold`), never building the [T, D] features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.codecs.fold import CompactCode
from shared.errors import CodecError

_FIT_ITERATIONS = 60
_FIT_SEED = 0


@register_stage
class Sparse(CalibratedStage, TensorStage):
    name = "sparse"
    params: ClassVar[tuple[Param, ...]] = (
        Param("atoms", int, 256, lo=2, hi=32_767),
        Param("k", int, 8, lo=1, hi=1024),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("x", "idx")

    atoms: int
    k: int
    _mean: torch.Tensor
    _dict: torch.Tensor

    def fit(self, samples: Sequence[Fields]) -> dict[str, torch.Tensor]:
        from sklearn.decomposition import MiniBatchDictionaryLearning

        x = torch.cat([s["x"].reshape(-1, s["x"].shape[-1]).double() for s in samples]).numpy()
        if self.k > min(self.atoms, x.shape[1]):
            raise CodecError(
                f"sparse: k={self.k} must be at most atoms ({self.atoms}) and the dim ({x.shape[1]})"
            )
        mean = x.mean(0)
        learner = MiniBatchDictionaryLearning(
            n_components=self.atoms,
            alpha=0.1,
            batch_size=256,
            max_iter=_FIT_ITERATIONS,
            random_state=_FIT_SEED,
            transform_algorithm="omp",
        )
        learner.fit(x - mean)
        atoms = learner.components_
        atoms = atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-12)
        tensors = {
            "mean": torch.from_numpy(mean).float(),
            "atoms": torch.from_numpy(atoms).float().contiguous(),
        }
        self.load_state(tensors, None)
        return tensors

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "atoms" not in tensors or tensors["atoms"].dim() != 2:
            raise CodecError("calibration artifact for 'sparse' lacks a 2-D tensor 'atoms'")
        dim = int(tensors["atoms"].shape[1])
        self._dict = get_tensor(self.name, tensors, "atoms", (self.atoms, dim))
        self._mean = get_tensor(self.name, tensors, "mean", (dim,))
        if self.k > dim:
            raise CodecError(f"sparse: k={self.k} is larger than the calibrated dim {dim}")

    def _check_dim(self, ctx: CodecContext) -> None:
        self.require_calibrated()
        if ctx.dim != self._dict.shape[1]:
            raise CodecError(
                f"sparse was calibrated on {self._dict.shape[1]}-dim features, these have dim {ctx.dim}"
            )

    def output_shape(self, ctx: CodecContext) -> tuple[int, int]:
        """Stages after this one see the coefficients ``x`` as [T, k]."""
        return (ctx.tokens, self.k)

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        self._check_dim(ctx)
        return {
            "x": FieldSpec((ctx.tokens, self.k), (torch.float32,)),
            "idx": FieldSpec((ctx.tokens, self.k), (torch.int16,)),
        }

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        from sklearn.linear_model import orthogonal_mp_gram

        self._check_dim(ctx)
        atoms = self._dict.double().numpy()
        x = fields["x"].double().numpy() - self._mean.double().numpy()
        gram = atoms @ atoms.T
        coef = (
            np.asarray(orthogonal_mp_gram(gram, atoms @ x.T, n_nonzero_coefs=self.k))
            .reshape(self.atoms, -1)
            .T
        )
        # The k largest (OMP leaves at most k non-zero), in ascending atom order for the entropy coder.
        idx = np.sort(np.argsort(-np.abs(coef), axis=1, kind="stable")[:, : self.k], axis=1)
        values = np.take_along_axis(coef, idx, axis=1)
        return {
            "x": torch.from_numpy(values).float().contiguous(),
            "idx": torch.from_numpy(idx.astype(np.int16)).contiguous(),
        }

    def linear_decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [atoms, D], μ [D]) with decode = Σ_j x[t, j] · A[idx[t, j]] + μ, for folding."""
        self.require_calibrated()
        return self._dict.clone(), self._mean.clone()

    def compact(self, fields: Fields, ctx: CodecContext) -> CompactCode:
        """The sparse code (coefficients [T, k], checked atom indices [T, k]) `decode` applies."""
        self._check_dim(ctx)
        idx = fields["idx"].long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.atoms):
            raise CodecError(f"corrupt payload: sparse atom indices must lie in [0, {self.atoms})")
        coef = fields["x"].float()
        if coef.shape != idx.shape:
            raise CodecError(
                f"corrupt payload: sparse coefficients {tuple(coef.shape)} and indices "
                f"{tuple(idx.shape)} differ in shape"
            )
        return CompactCode(coef, idx)

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        x = self.compact(fields, ctx).apply(self._dict, self._mean)
        return {"x": x.to(ctx.dtype)}
