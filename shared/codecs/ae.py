"""``ae``: a small per-token MLP autoencoder trained on calibration features.

    calibrate:  features [N, D] ──standardize (μ, σ per channel)──► train enc/dec (MSE, Adam)

    encode:  {"x": float [T, D]} ──(x - μ)/σ──► Linear(D, H) ─GELU─► Linear(H, dim)
             ──► {"x": float32 [T, dim]}
    decode:  {"x": [T, dim]} ──► Linear(dim, H) ─GELU─► Linear(H, D) ──·σ + μ──► {"x": [T, D]}

A learned non-linear transform code in the spirit of Ballé et al. ("End-to-end
optimized image compression", ICLR 2017), reduced to one token at a time and
trained for reconstruction MSE only (no rate term: the quantizer and entropy
coder that follow, e.g. ``ae:dim=32|int8|zstd``, are fixed). Training is
deterministic (fixed seed, full-batch Adam) so one calibration set gives one
artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.errors import CodecError

_STEPS = 400
_LR = 3e-3
_SEED = 0
_NAMES = ("enc1", "enc2", "dec1", "dec2")


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


@register_stage
class AutoEncoder(CalibratedStage, TensorStage):
    name = "ae"
    params: ClassVar[tuple[Param, ...]] = (
        Param("dim", int, 32, lo=1, hi=65_536),
        Param("hidden", int, 128, lo=1, hi=65_536),
    )

    dim: int
    hidden: int
    _w: dict[str, torch.Tensor]

    def _shapes(self, d: int) -> dict[str, tuple[int, int]]:
        h = self.hidden
        return {"enc1": (h, d), "enc2": (self.dim, h), "dec1": (h, self.dim), "dec2": (d, h)}

    def fit(self, samples: Sequence[Fields]) -> dict[str, torch.Tensor]:
        x = torch.cat([s["x"].reshape(-1, s["x"].shape[-1]).float() for s in samples])
        d = int(x.shape[1])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        g = torch.Generator().manual_seed(_SEED)
        weights = {
            name: (torch.randn(shape, generator=g) / shape[1] ** 0.5).requires_grad_()
            for name, shape in self._shapes(d).items()
        }
        biases = {name: torch.zeros(shape[0], requires_grad=True) for name, shape in self._shapes(d).items()}
        params = [*weights.values(), *biases.values()]
        opt = torch.optim.Adam(params, lr=_LR)
        with torch.enable_grad():
            for _ in range(_STEPS):
                opt.zero_grad()
                y = self._run(xs, weights, biases)
                loss = (y - xs).pow(2).mean()
                loss.backward()
                opt.step()
        tensors = {"mean": mean, "std": std}
        for name in _NAMES:
            tensors[f"{name}.weight"] = weights[name].detach().clone()
            tensors[f"{name}.bias"] = biases[name].detach().clone()
        self.load_state(tensors, None)
        return tensors

    @staticmethod
    def _run(
        x: torch.Tensor, w: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], part: str = "both"
    ) -> torch.Tensor:
        if part in ("both", "enc"):
            x = _gelu(x @ w["enc1"].T + b["enc1"]) @ w["enc2"].T + b["enc2"]
        if part in ("both", "dec"):
            x = _gelu(x @ w["dec1"].T + b["dec1"]) @ w["dec2"].T + b["dec2"]
        return x

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "mean" not in tensors or tensors["mean"].dim() != 1:
            raise CodecError("calibration artifact for 'ae' lacks a 1-D tensor 'mean'")
        d = int(tensors["mean"].shape[0])
        loaded = {
            "mean": get_tensor(self.name, tensors, "mean", (d,)),
            "std": get_tensor(self.name, tensors, "std", (d,)),
        }
        for name, shape in self._shapes(d).items():
            loaded[f"{name}.weight"] = get_tensor(self.name, tensors, f"{name}.weight", shape)
            loaded[f"{name}.bias"] = get_tensor(self.name, tensors, f"{name}.bias", (shape[0],))
        if bool((loaded["std"] <= 0).any()):
            raise CodecError("calibration artifact for 'ae': 'std' must be positive")
        self._w = loaded

    def _parts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (
            {n: self._w[f"{n}.weight"] for n in _NAMES},
            {n: self._w[f"{n}.bias"] for n in _NAMES},
        )

    def _check_dim(self, ctx: CodecContext) -> None:
        self.require_calibrated()
        d = int(self._w["mean"].shape[0])
        if ctx.dim != d:
            raise CodecError(f"ae was calibrated on {d}-dim features, these have dim {ctx.dim}")

    def output_shape(self, ctx: CodecContext) -> tuple[int, int]:
        """Stages after this one see the latent ``x`` as [T, dim]."""
        return (ctx.tokens, self.dim)

    def layout(self, fields: Layout, ctx: CodecContext) -> Layout:
        self._check_dim(ctx)
        return {"x": FieldSpec((ctx.tokens, self.dim), (torch.float32,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        w, b = self._parts()
        xs = (fields["x"].float() - self._w["mean"]) / self._w["std"]
        with torch.no_grad():
            return {"x": self._run(xs, w, b, "enc").contiguous()}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        w, b = self._parts()
        with torch.no_grad():
            y = self._run(fields["x"].float(), w, b, "dec")
        return {"x": (y * self._w["std"] + self._w["mean"]).to(ctx.dtype)}
