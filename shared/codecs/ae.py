"""``ae``: a small per-token MLP autoencoder trained on calibration features, optionally vector-quantized.

    calibrate:  features [N, D] ──standardize (μ, σ per channel)──► train enc/dec (MSE, Adam)
       vq=K:    ──► latents z [N, dim] split into P = parts sub-vectors of dim / P
                ──► k-means per part ──► codebook C float32 [P, K, dim / P]
                ──► fine-tune dec on the quantized latents (enc and C fixed)

    encode:  {"x": float [T, D]} ──(x - μ)/σ──► Linear(D, H) ─GELU─► Linear(H, dim)
             ──► {"x": float32 [T, dim]}
       vq=K: ──► i[t, p] = argmin_k |z[t, p] - C[p, k]|
             ──► {"q": uint8 [ceil(T*P*b/8)]}, b = ceil(log2 K) bits per index, packed LSB first
    decode:  {"x": [T, dim]}  (vq: z[t, p] = C[p, i[t, p]], index >= K ─► CodecError)
             ──► Linear(dim, H) ─GELU─► Linear(H, D) ──·σ + μ──► {"x": [T, D]}

A learned non-linear transform code in the spirit of Ballé et al. ("End-to-end
optimized image compression", ICLR 2017), reduced to one token at a time and
trained for reconstruction MSE only (no rate term: the quantizer and entropy
coder that follow, e.g. ``ae:dim=32|int8|zstd``, are fixed). Training is
deterministic (fixed seed, full-batch Adam) so one calibration set gives one
artifact.

``ae:dim=32,vq=256,parts=4`` makes the bottleneck discrete, as in VQ-VAE (van
den Oord et al., "Neural discrete representation learning", NeurIPS 2017), with
the latent split into ``parts`` sub-vectors each quantized by its own codebook
(product quantization, Jégou et al., 2011): a token costs ``parts · ceil(log2 K)``
bits. Rather than training the codebook with the straight-through estimator and
commitment loss, the codebook is fitted post hoc by k-means on the trained
encoder's latents and the decoder is then fine-tuned on the quantized latents
(200 full-batch steps: about a third of the AE's own training cost; k-means
itself takes well under a second to a few seconds). ``vq`` and ``parts`` are keyword-only and left out of the
canonical spec when off, so plain ``ae`` specs keep their fingerprints. The
stage is then itself the codec's quantizer: follow it with byte stages only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch

from shared.codecs.base import CodecContext, Fields, FieldSpec, Layout, Param, TensorStage, register_stage
from shared.codecs.bitpack import pack_wide, packed_len, unpack_wide
from shared.codecs.calibration import CalibratedStage, get_tensor
from shared.errors import CodecError

_STEPS = 400
_LR = 3e-3
_SEED = 0
_NAMES = ("enc1", "enc2", "dec1", "dec2")
# VQ fitting: Lloyd iterations, at most this many latents for k-means, decoder fine-tuning steps.
_KMEANS_ITERATIONS = 25
_KMEANS_SAMPLES = 16_384
_VQ_STEPS = 200
# Distances computed at once when searching the codebooks (bounds memory at 16 MiB of float32).
_BLOCK = 1 << 22


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x)


def nearest(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Per part, the index of the nearest codeword: z [N, P, s], codebooks [P, K, s] -> int64 [N, P]."""
    parts, k = int(codebooks.shape[0]), int(codebooks.shape[1])
    norms = codebooks.pow(2).sum(-1).unsqueeze(1)  # [P, 1, K]; |z|² is the same for every k
    rows = max(1, _BLOCK // (parts * k))
    out = [
        torch.baddbmm(norms, block.transpose(0, 1), codebooks.transpose(1, 2), alpha=-2).argmin(-1).T
        for block in z.split(rows)
    ]
    return torch.cat(out) if out else torch.zeros(0, parts, dtype=torch.long)


def kmeans(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means per part, all parts at once: z [N, P, s] -> centres float32 [P, k, s].

    Seeded by random rows (repeated when N < k); an empty cell keeps its centre.
    """
    n, parts, sub = (int(d) for d in z.shape)
    if n > _KMEANS_SAMPLES:
        z = z[torch.randperm(n, generator=generator)[:_KMEANS_SAMPLES]]
        n = _KMEANS_SAMPLES
    start = (
        torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    )
    centres = z[start].transpose(0, 1).contiguous()  # [P, k, s]
    offsets = torch.arange(parts).unsqueeze(0) * k  # cell index of (part, code): part * k + code
    flat_z = z.reshape(n * parts, sub)
    for _ in range(_KMEANS_ITERATIONS):
        cells = (nearest(z, centres) + offsets).reshape(-1)
        sums = torch.zeros(parts * k, sub).index_add_(0, cells, flat_z).reshape(parts, k, sub)
        counts = torch.bincount(cells, minlength=parts * k).reshape(parts, k, 1)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres.float().contiguous()


@register_stage
class AutoEncoder(CalibratedStage, TensorStage):
    name = "ae"
    params: ClassVar[tuple[Param, ...]] = (
        Param("dim", int, 32, lo=1, hi=65_536),
        Param("hidden", int, 128, lo=1, hi=65_536),
        Param("vq", int, 0, lo=0, hi=65_536, keyword_only=True),
        Param("parts", int, 1, lo=1, hi=65_536, keyword_only=True),
    )

    dim: int
    hidden: int
    vq: int
    parts: int
    _w: dict[str, torch.Tensor]

    def __init__(self, **values: object) -> None:
        super().__init__(**values)
        if self.vq == 1:
            raise CodecError(f"stage {self.name!r}: vq must be 0 (off) or a codebook size of at least 2")
        if not self.vq and self.parts != 1:
            raise CodecError(f"stage {self.name!r}: parts={self.parts} applies only with vq=K")
        if self.dim % self.parts:
            raise CodecError(
                f"stage {self.name!r}: dim={self.dim} is not a multiple of parts={self.parts}; "
                "each part quantizes dim / parts latent channels"
            )
        if self.vq:
            # Indices replace the float latent, and the stage becomes the codec's quantizer.
            # (Set on the instance: the pipeline reads `outputs` and `quantizer` per stage.)
            self.__dict__["outputs"] = ("q",)
            self.__dict__["quantizer"] = True

    @property
    def spec(self) -> str:
        spec = f"{self.name}:dim={self.dim},hidden={self.hidden}"
        # Left out when off, so plain ae specs keep their canonical form (and fingerprint).
        return spec + (f",vq={self.vq},parts={self.parts}" if self.vq else "")

    @property
    def index_bits(self) -> int:
        """Bits per VQ index: ceil(log2 vq)."""
        return (self.vq - 1).bit_length()

    def _shapes(self, d: int) -> dict[str, tuple[int, int]]:
        h = self.hidden
        return {"enc1": (h, d), "enc2": (self.dim, h), "dec1": (h, self.dim), "dec2": (d, h)}

    def _codebook_shape(self) -> tuple[int, int, int]:
        return (self.parts, self.vq, self.dim // self.parts)

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
        if self.vq:
            tensors["codebook"] = self._fit_vq(xs, weights, biases, g)
        for name in _NAMES:
            tensors[f"{name}.weight"] = weights[name].detach().clone()
            tensors[f"{name}.bias"] = biases[name].detach().clone()
        self.load_state(tensors, None)
        return tensors

    def _fit_vq(
        self,
        xs: torch.Tensor,
        weights: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor],
        g: torch.Generator,
    ) -> torch.Tensor:
        """k-means codebooks on the encoder's latents, then the decoder fine-tuned on their codewords."""
        with torch.no_grad():
            z = self._run(xs, weights, biases, "enc")
        codebook = kmeans(self._split(z), self.vq, g)
        zq = self._lookup(codebook, self._assign(codebook, z))
        dec = [weights["dec1"], weights["dec2"], biases["dec1"], biases["dec2"]]
        opt = torch.optim.Adam(dec, lr=_LR)
        with torch.enable_grad():
            for _ in range(_VQ_STEPS):
                opt.zero_grad()
                loss = (self._run(zq, weights, biases, "dec") - xs).pow(2).mean()
                loss.backward()
                opt.step()
        return codebook

    def _split(self, z: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N, parts, dim / parts]."""
        return z.reshape(z.shape[0], self.parts, self.dim // self.parts)

    def _assign(self, codebook: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Nearest codeword per part: int64 [N, parts]."""
        return nearest(self._split(z.float()), codebook)

    def _lookup(self, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Codewords for indices [N, parts]: the quantized latents [N, dim]."""
        return codebook[torch.arange(self.parts).unsqueeze(0), idx].reshape(idx.shape[0], self.dim)

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
        if self.vq:
            loaded["codebook"] = get_tensor(self.name, tensors, "codebook", self._codebook_shape())
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
        if self.vq:
            return {"q": FieldSpec((packed_len(ctx.tokens * self.parts, self.index_bits),), (torch.uint8,))}
        return {"x": FieldSpec((ctx.tokens, self.dim), (torch.float32,))}

    def encode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        w, b = self._parts()
        xs = (fields["x"].float() - self._w["mean"]) / self._w["std"]
        with torch.no_grad():
            z = self._run(xs, w, b, "enc").contiguous()
            if not self.vq:
                return {"x": z}
            idx = self._assign(self._w["codebook"], z).numpy()
        return {"q": torch.from_numpy(pack_wide(idx.astype(np.uint16), self.index_bits))}

    def decode(self, fields: Fields, ctx: CodecContext) -> Fields:
        self._check_dim(ctx)
        w, b = self._parts()
        if self.vq:
            n = ctx.tokens * self.parts
            idx = unpack_wide(fields["q"].numpy(), n, self.index_bits)
            if int(idx.max(initial=0)) >= self.vq:
                raise CodecError(
                    f"corrupt payload: VQ index {int(idx.max())} is out of range for a codebook "
                    f"of {self.vq} entries"
                )
            z = self._lookup(
                self._w["codebook"], torch.from_numpy(idx.astype(np.int64)).reshape(-1, self.parts)
            )
        else:
            z = fields["x"].float()
        with torch.no_grad():
            y = self._run(z, w, b, "dec")
        return {"x": (y * self._w["std"] + self._w["mean"]).to(ctx.dtype)}
