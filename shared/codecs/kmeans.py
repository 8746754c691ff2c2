"""``kmeans``: non-uniform scalar quantization with codebooks fitted on calibration features.

    calibrate:  values per channel (or all values) ──1-D k-means (Lloyd)──►
                codebook C float32 [D, 2^bits] (granularity=channel) | [1, 2^bits] (global),
                each row sorted ascending

    encode:  {"x": float [T, D]} ──► i = argmin_j |x - C[c, j]| (via midpoints + searchsorted)
             ──► {"q": uint8 [ceil(T*D*bits/8)]  (bits < 8: packed LSB-first, `bitpack`)
                        | uint8 [T, D]            (bits = 8)}
    decode:  x̂[t, c] = C[c, i[t, c]]  ──► {"x": [T, D]}

Lloyd-Max quantization (Lloyd, 1957/1982; Max, 1960): for a scalar source the
MSE-optimal non-uniform quantizer is a 1-D k-means codebook. Every code is a
valid index, so decode needs no range check; the codebook lives in the
calibration artifact, not in the payload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.bitpack import pack_bits, packed_len, unpack_bits
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.errors import CodecError

_ITERATIONS = 30


def lloyd_1d(values: np.ndarray, levels: int, iterations: int = _ITERATIONS) -> np.ndarray:
    """Sorted 1-D k-means codebook of `levels` entries for `values` (quantile init, Lloyd steps)."""
    v = np.sort(values.astype(np.float64).reshape(-1))
    centres = np.quantile(v, (np.arange(levels) + 0.5) / levels)
    for _ in range(iterations):
        edges = (centres[1:] + centres[:-1]) / 2
        assign = np.searchsorted(edges, v)
        sums = np.bincount(assign, weights=v, minlength=levels)
        counts = np.bincount(assign, minlength=levels)
        # An empty cell keeps its centre.
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(updated, centres, rtol=0, atol=1e-12):
            break
        centres = np.sort(updated)
    return centres


@register_stage
class KMeans(CalibratedStage, TensorStage):
    name = "kmeans"
    params: ClassVar[tuple[Param, ...]] = (
        Param("bits", int, 4, lo=1, hi=8),
        Param("granularity", str, "channel", choices=("channel", "global")),
    )
    inputs: ClassVar[tuple[str, ...]] = ("x",)
    outputs: ClassVar[tuple[str, ...]] = ("q",)
    quantizer = True

    bits: int
    granularity: str
    _codebook: torch.Tensor

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def fit(self, samples: Sequence[Fields]) -> dict[str, torch.Tensor]:
        x = torch.cat([s["x"].reshape(-1, s["x"].shape[-1]).double() for s in samples]).numpy()
        columns = [x] if self.granularity == "global" else [x[:, c] for c in range(x.shape[1])]
        codebook = torch.from_numpy(np.stack([lloyd_1d(col, self.levels) for col in columns])).float()
        tensors = {"codebook": codebook.contiguous()}
        self.load_state(tensors, None)
        return tensors

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "codebook" not in tensors or tensors["codebook"].dim() != 2:
            raise CodecError("calibration artifact for 'kmeans' lacks a 2-D tensor 'codebook'")
        rows = 1 if self.granularity == "global" else int(tensors["codebook"].shape[0])
        codebook = get_tensor(self.name, tensors, "codebook", (rows, self.levels))
        if bool((codebook[:, 1:] < codebook[:, :-1]).any()):
            raise CodecError("calibration artifact for 'kmeans': codebook rows must be sorted")
        self._codebook = codebook

    def _rows(self, ctx: CodecContext) -> torch.Tensor:
        """The codebook row for each channel: [D, levels]."""
        self.require_calibrated()
        if self.granularity == "global":
            return self._codebook.expand(ctx.dim, -1)
        if ctx.dim != self._codebook.shape[0]:
            raise CodecError(
                f"kmeans was calibrated on {self._codebook.shape[0]}-dim features, these have dim {ctx.dim}"
            )
        return self._codebook

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        self._rows(ctx)
        if self.bits == 8:
            return {"q": FieldSpec(ctx.shape, (torch.uint8,))}
        return {"q": FieldSpec((packed_len(ctx.tokens * ctx.dim, self.bits),), (torch.uint8,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        rows = self._rows(ctx).double()
        x = fields["x"].double()
        edges = ((rows[:, 1:] + rows[:, :-1]) / 2).contiguous()  # [D, levels - 1]
        # searchsorted per channel: boundaries [D, L-1], values [D, T].
        codes = torch.searchsorted(edges, x.T.contiguous()).T.to(torch.uint8)
        if self.bits == 8:
            return {"q": codes.contiguous()}
        return {"q": torch.from_numpy(pack_bits(codes.numpy(), self.bits))}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        rows = self._rows(ctx)
        n = ctx.tokens * ctx.dim
        if self.bits == 8:
            codes = fields["q"].reshape(ctx.shape).long()
        else:
            codes = torch.from_numpy(unpack_bits(fields["q"].numpy(), n, self.bits).reshape(ctx.shape)).long()
        x = torch.gather(rows.T.contiguous(), 0, codes)  # x[t, c] = rows[c, codes[t, c]]
        return {"x": x.to(ctx.dtype)}
