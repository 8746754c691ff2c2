"""Compressed-domain decoding: fold a codec's linear decoder into the connector's first Linear.

When a codec's decode ends in a linear map from compact coefficients to the
features x, and the Rx connector starts with a Linear (LLaVA's projector:
``linear_1``, x A^T + c), the two compose into one map. Both foldable stages
decode through a `CompactCode` over the rows of a decoder matrix W [n, D]
plus an offset b [D]::

    pca     dense:   x[t] = Σ_j z[t, j] · W[j]          + b   (W = basis [k, D], b = mean)
    sparse  gather:  x[t] = Σ_j z[t, j] · W[idx[t, j]]  + b   (W = atoms [n_atoms, D], b = mean; k per token)

    normal:  payload ─► zstd⁻¹ ─► int8⁻¹ ─► code ─► x = code·W + b [T, D] ─► h = xAᵀ + c [T, H] ─► GELU ─► …
    folded:  payload ─► zstd⁻¹ ─► int8⁻¹ ─► code ─────► h = code·W' + b' [T, H] ──────────────► GELU ─► …

    W' = W Aᵀ  [n, H],   b' = b Aᵀ + c  [H]   (computed once per codec fingerprint, in float64)

x is never materialised, and the per-request cost of the first layer drops from
T·k·D + T·D·H multiply-adds (decode, then linear_1) to T·k·H, k being the
coefficients per token (pca: components; sparse: non-zeros). A sparse code is
applied by gathering its k rows of W' per token (``embedding_bag``), not by a
dense [T, n_atoms] matmul (T·n_atoms·H). Quantizers and byte stages after the
transform are undone first: folding starts from the dequantized coefficients.

    code, decoder = codec.decode_compact(payload, shape, dtype)   # codec.linear_decoder() not None
    folded = fold(decoder, half.leading_linear())                 # FoldedDecoder: code -> [T, H]
    h = folded(code)                                              # = linear_1(codec.decode(...))
    half.generate(prompt, VisionFeatures(h, meta, pre_projected=True), options)

`FoldCache` keeps the folded decoder per codec fingerprint on the Rx.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import CodecError

if TYPE_CHECKING:
    from shared.codecs.pipeline import Codec

LinearDecoder = tuple[torch.Tensor, torch.Tensor]  # (W [n, D], b [D]): x = code·W + b


@dataclass(frozen=True)
class CompactCode:
    """Coefficients of a linear decoder: ``x[t] = Σ_j values[t, j] · W[row(t, j)] + b``.

    ``indices`` None: dense, ``row(t, j) = j`` (``values`` is [T, n], x = values @ W + b).
    Otherwise ``row(t, j) = indices[t, j]`` (int64 [T, k], each in [0, n)): a sparse code.
    """

    values: torch.Tensor  # float [T, k]
    indices: torch.Tensor | None = None  # int64 [T, k], or None (dense)

    @property
    def tokens(self) -> int:
        return int(self.values.shape[0])

    def apply(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``code·weight + bias`` ([T, F]) for a row matrix `weight` [n, F] and `bias` [F].

        Dense: one matmul (T·n·F multiply-adds). Sparse: the k rows each token uses are
        gathered and weighted (T·k·F), never a [T, n] coefficient matrix or a [T, k, F] gather.
        """
        values = self.values.to(weight.dtype)
        if self.indices is None:
            return torch.addmm(bias.to(weight.dtype), values, weight)
        summed = F.embedding_bag(self.indices, weight, per_sample_weights=values, mode="sum")
        return summed + bias.to(weight.dtype)

    def dense(self, rows: int) -> torch.Tensor:
        """The equivalent dense coefficient matrix [T, rows] (for tests and reference paths)."""
        if self.indices is None:
            return self.values
        out = torch.zeros(self.tokens, rows, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CompactCode:
        indices = None if self.indices is None else self.indices.to(device)
        return CompactCode(self.values.to(device=device, dtype=dtype), indices)

    def check(self, tokens: int, rows: int) -> None:
        """CodecError unless this is a finite code for `tokens` tokens over `rows` decoder rows."""
        values = self.values
        width = rows if self.indices is None else int(self.indices.shape[-1])
        if values.dim() != 2 or tuple(values.shape) != (tokens, width) or not values.is_floating_point():
            raise CodecError(
                f"corrupt payload: coefficients have shape {tuple(values.shape)} {values.dtype}, "
                f"expected ({tokens}, {width}) float"
            )
        if self.indices is not None:
            idx = self.indices
            if idx.shape != values.shape or idx.dtype != torch.int64:
                raise CodecError(
                    f"corrupt payload: indices {tuple(idx.shape)} {idx.dtype} do not match the "
                    f"coefficients {tuple(values.shape)}"
                )
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= rows):
                raise CodecError(f"corrupt payload: decoder row indices must lie in [0, {rows})")
        if not bool(torch.isfinite(values).all()):
            raise CodecError("corrupt payload: decoded coefficients contain NaN or Inf")


class FoldedDecoder(nn.Module):
    """``leading_linear(code·W + b)`` as ``code·W' + b'``: W' [n, H] (one row per basis vector or
    atom), b' [H]. Called on a `CompactCode` (or a dense [T, n] tensor); returns [T, H]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, code: CompactCode | torch.Tensor) -> torch.Tensor:
        if isinstance(code, torch.Tensor):
            code = CompactCode(code)
        return code.to(self.weight.device, self.weight.dtype).apply(self.weight, self.bias)


def fold(linear_decoder: LinearDecoder, leading_linear: nn.Linear) -> FoldedDecoder:
    """A `FoldedDecoder` equal to ``leading_linear(code·W + b)``, on its device and dtype."""
    w, b = linear_decoder
    a = leading_linear.weight.detach()  # [H, D]
    if w.dim() != 2 or b.shape != (w.shape[1],) or a.shape[1] != w.shape[1]:
        raise ValueError(
            f"cannot fold a decoder of shape W {tuple(w.shape)}, b {tuple(b.shape)} "
            f"into a Linear with weight {tuple(a.shape)}"
        )
    a64 = a.double().cpu()
    weight = w.double().cpu() @ a64.T  # [n, H]
    bias = b.double().cpu() @ a64.T  # [H]
    if leading_linear.bias is not None:
        bias = bias + leading_linear.bias.detach().double().cpu()
    folded = FoldedDecoder(
        weight.to(device=a.device, dtype=a.dtype).contiguous(), bias.to(device=a.device, dtype=a.dtype)
    )
    return folded.eval().requires_grad_(False)


def flops(tokens: int, k: int, dim: int, hidden: int) -> tuple[int, int]:
    """Multiply-adds of (decode then the first Linear, the folded decoder) for `tokens` tokens with
    `k` coefficients each (pca: components; sparse: non-zeros, gathered)."""
    return tokens * k * dim + tokens * dim * hidden, tokens * k * hidden


class FoldCache:
    """Folded decoders by codec fingerprint, for one leading Linear (thread-safe)."""

    def __init__(self, leading_linear: nn.Linear, max_entries: int = 64) -> None:
        self.leading_linear = leading_linear
        self.max_entries = max_entries
        self._folded: dict[str, FoldedDecoder] = {}
        self._lock = threading.Lock()

    def get(self, codec: Codec) -> FoldedDecoder | None:
        """The folded decoder for `codec`, or None when its decoder is not linear."""
        with self._lock:
            cached = self._folded.get(codec.fingerprint)
            if cached is not None:
                return cached
            decoder = codec.linear_decoder()
            if decoder is None:
                return None
            folded = fold(decoder, self.leading_linear)
            if len(self._folded) < self.max_entries:
                self._folded[codec.fingerprint] = folded
            return folded
