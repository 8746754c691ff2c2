"""Compressed-domain decoding: fold a codec's linear decoder into the connector's first Linear.

When a codec's decode ends in an affine map from compact coefficients z to the
features x (``pca``: x = z W + b), and the Rx connector starts with a Linear
(LLaVA's projector: ``linear_1``, x A^T + c), the two compose into one Linear::

    normal:  payload ─► zstd⁻¹ ─► int8⁻¹ ─► z [T, k] ─► x = zW + b [T, D] ─► h = xAᵀ + c [T, H] ─► GELU ─► …
    folded:  payload ─► zstd⁻¹ ─► int8⁻¹ ─► z [T, k] ─────► h = zW' + b' [T, H] ─────────────► GELU ─► …

    W' = W Aᵀ  [k, H],   b' = b Aᵀ + c  [H]   (computed once per codec fingerprint, in float64)

x is never materialised, and the per-request cost of the first layer drops from
T·k·D + T·D·H multiply-adds (decode, then linear_1) to T·k·H.

    z, decoder = codec.decode_compact(payload, shape, dtype)   # (z, (W, b)); codec.linear_decoder() not None
    folded = fold(decoder, half.leading_linear())              # nn.Linear(k -> H)
    h = folded(z)                                              # = linear_1(codec.decode(...))
    half.generate(prompt, VisionFeatures(h, meta, pre_projected=True), options)

`FoldCache` keeps the folded Linear per codec fingerprint on the Rx.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from shared.codecs.pipeline import Codec

LinearDecoder = tuple[torch.Tensor, torch.Tensor]  # (W [k, D], b [D]): x = z W + b


def fold(linear_decoder: LinearDecoder, leading_linear: nn.Linear) -> nn.Linear:
    """One ``nn.Linear(k, H)`` equal to ``leading_linear(z @ W + b)``, on its device and dtype."""
    w, b = linear_decoder
    a = leading_linear.weight.detach()  # [H, D]
    if w.dim() != 2 or b.shape != (w.shape[1],) or a.shape[1] != w.shape[1]:
        raise ValueError(
            f"cannot fold a decoder of shape W {tuple(w.shape)}, b {tuple(b.shape)} "
            f"into a Linear with weight {tuple(a.shape)}"
        )
    a64 = a.double().cpu()
    weight = w.double().cpu() @ a64.T  # [k, H]
    bias = b.double().cpu() @ a64.T  # [H]
    if leading_linear.bias is not None:
        bias = bias + leading_linear.bias.detach().double().cpu()
    k, h = int(weight.shape[0]), int(weight.shape[1])
    folded = nn.Linear(k, h, bias=True, device=a.device, dtype=a.dtype)
    with torch.no_grad():
        folded.weight.copy_(weight.T.to(a.dtype))
        folded.bias.copy_(bias.to(a.dtype))
    return folded.eval().requires_grad_(False)


def flops(tokens: int, k: int, dim: int, hidden: int) -> tuple[int, int]:
    """Multiply-adds of (decode then the first Linear, the folded Linear) for `tokens` tokens."""
    return tokens * k * dim + tokens * dim * hidden, tokens * k * hidden


class FoldCache:
    """Folded Linears by codec fingerprint, for one leading Linear (thread-safe)."""

    def __init__(self, leading_linear: nn.Linear, max_entries: int = 64) -> None:
        self.leading_linear = leading_linear
        self.max_entries = max_entries
        self._folded: dict[str, nn.Linear] = {}
        self._lock = threading.Lock()

    def get(self, codec: Codec) -> nn.Linear | None:
        """The folded Linear for `codec`, or None when its decoder is not linear."""
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
