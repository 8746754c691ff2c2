"""Rate control: pick a codec per image from a ladder, to meet a byte budget or a fidelity floor.

    features ─► ladder of specs, highest quality first, smallest payload last
                 raw|zstd ► fp16|zstd ► int8|zstd ► linear:bits=6|zstd ► ... ► pool:4|linear:bits=2|zstd
             ─► target_bytes=N:     the highest-quality candidate whose payload is <= N bytes
                                     (binary search over the ladder: ~log2(len) encodes)
             ─► target_fidelity=C:  the smallest payload whose decoded features keep a mean
                                     per-token cosine >= C against the original (scan from the
                                     smallest candidate up; full-token candidates only)
             ─► RateChoice(codec, payload, decoded shape, fidelity, candidates tried)

Every default ladder spec is calibration-free, so rate control works for any model. The
ladder is ordered by nominal payload size; the search assumes sizes (and
fidelities) fall along it, which holds on the tiny model's features up to zstd's
few bytes of slack but not on every model's (on the reference model
``pool:2|linear:bits=4`` is larger than ``linear:bits=2``: use a measured ladder).
Whatever the ordering, a chosen payload always meets the budget: sizes are
measured by encoding, never estimated.

Token-reducing candidates (``prune``, ``pool``) are only in the ladder when the
split supports token reduction (`usable_ladder`), and only in byte-budget mode:
their decoded features have fewer tokens than the original, so no per-token
cosine against the original is defined, and a cosine against the reduced
reference would hide the loss of the dropped tokens. Fidelity mode therefore
chooses among full-token candidates only. With both targets set, the fidelity
choice must also fit the budget (CodecError otherwise).

Given a measured ladder (`shared.codecs.ladder`: each candidate's held-out accuracy
and mean payload on this model), the order is by accuracy instead: ``target_bytes=N``
encodes candidates most accurate first and takes the first whose payload is <= N
(a linear scan, since accuracy does not fall along size), and fidelity mode scans
by measured mean payload, smallest first. Without one, nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shared.codecs.ladder import Artifacts, MeasuredLadder, Rung
from shared.codecs.pipeline import Codec, build_codec
from shared.errors import CodecError

# Highest quality first; each candidate's nominal payload is smaller than the one before it.
DEFAULT_LADDER: tuple[str, ...] = (
    "raw|zstd",
    "fp16|zstd",
    "int8|zstd",
    "linear:bits=6|zstd",
    "linear:bits=4|zstd",
    "linear:bits=3|zstd",
    "prune:0.5|linear:bits=4|zstd",
    "linear:bits=2|zstd",
    "pool:2|linear:bits=4|zstd",
    "pool:2|linear:bits=3|zstd",
    "pool:2|linear:bits=2|zstd",
    "pool:4|linear:bits=4|zstd",
    "pool:4|linear:bits=3|zstd",
    "pool:4|linear:bits=2|zstd",
)


@dataclass(frozen=True)
class RateTarget:
    """What rate control aims for: a payload budget (bytes), a fidelity floor (cosine), or both.

    0 means unset for either; `active` is false when both are unset.
    """

    max_bytes: int = 0
    min_fidelity: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise CodecError(f"target_bytes must be a non-negative int, got {self.max_bytes!r}")
        fidelity = self.min_fidelity
        if isinstance(fidelity, bool) or not isinstance(fidelity, int | float) or not math.isfinite(fidelity):
            raise CodecError(f"target_fidelity must be a number in [0, 1], got {fidelity!r}")
        if not 0.0 <= fidelity <= 1.0:
            raise CodecError(f"target_fidelity must lie in [0, 1] (a mean cosine), got {fidelity!r}")

    @property
    def active(self) -> bool:
        return self.max_bytes > 0 or self.min_fidelity > 0

    def describe(self) -> str:
        parts = []
        if self.max_bytes:
            parts.append(f"target_bytes={self.max_bytes}")
        if self.min_fidelity:
            parts.append(f"target_fidelity={self.min_fidelity:g}")
        return ",".join(parts) or "none"


@dataclass
class RateChoice:
    """The candidate rate control chose, its payload, and what it measured on the way."""

    codec: Codec
    payload: bytes
    shape: tuple[int, int]  # the decoded shape (fewer tokens for token reducers)
    target: RateTarget
    fidelity: float | None = None  # mean per-token cosine, measured in fidelity mode
    tried: list[tuple[str, int]] = field(default_factory=list)  # (spec, payload bytes) in encode order
    accuracy: float | None = None  # the candidate's held-out accuracy, from a measured ladder

    @property
    def spec(self) -> str:
        return self.codec.spec

    def note(self) -> str:
        """One line for logs and the final TextChunk's ``rate_control``."""
        text = f"{self.target.describe()}: chose {self.spec!r} ({len(self.payload)} B"
        if self.fidelity is not None:
            text += f", cosine {self.fidelity:.4f}"
        if self.accuracy is not None:
            text += f", held-out accuracy {self.accuracy:.1%}"
        return text + f"; {len(self.tried)} candidates encoded)"


def mean_token_cosine(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """Mean over tokens of cos(original_t, decoded_t), in float64; 1.0 for identical features.

    A zero token against a zero token counts as 1, a zero token against a non-zero one as 0.
    """
    if tuple(original.shape) != tuple(decoded.shape):
        raise CodecError(f"cannot compare shapes {tuple(original.shape)} and {tuple(decoded.shape)}")
    a, b = original.detach().double(), decoded.detach().double()
    if torch.equal(a, b):
        return 1.0
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    both_zero = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), both_zero.double())
    return float(cos.clamp(-1.0, 1.0).mean())


def usable_ladder(
    ladder: Sequence[str] = DEFAULT_LADDER, accept: Callable[[Codec], None] | None = None
) -> list[Codec]:
    """Build the ladder's codecs, dropping those `accept` refuses (raises CodecError), e.g. token
    reducers for a split without token-reduction support (`check_codec_support`)."""
    codecs = []
    for spec in ladder:
        codec = build_codec(spec)
        if codec.score_kind:
            continue  # needs the Tx half's scores; not calibration-free in the sense used here
        if accept is not None:
            try:
                accept(codec)
            except CodecError:
                continue
        codecs.append(codec)
    if not codecs:
        raise CodecError("rate control: no codec of the ladder is usable with this split")
    return codecs


class RateController:
    """Chooses, per image, a codec of `ladder` (highest quality first) that meets a `RateTarget`.

    With `measured` (instead of `ladder`), the candidates are its rungs, most accurate first,
    built with `artifacts` (calibrated rungs) and filtered by `accept` (see `MeasuredLadder.codecs`;
    the left-out rungs and why are in `skipped`).
    """

    def __init__(
        self,
        ladder: Sequence[Codec] | None = None,
        *,
        measured: MeasuredLadder | None = None,
        artifacts: Artifacts | None = None,
        accept: Callable[[Codec], None] | None = None,
    ) -> None:
        self.rungs: dict[str, Rung] | None = None  # spec -> measurements, with a measured ladder
        self.skipped: list[str] = []
        if measured is not None:
            if ladder is not None:
                raise CodecError("rate control takes a ladder of codecs or a measured ladder, not both")
            pairs, self.skipped = measured.codecs(artifacts, accept)
            self.ladder = [codec for codec, _ in pairs]
            self.rungs = {codec.spec: rung for codec, rung in pairs}
        else:
            self.ladder = list(ladder) if ladder is not None else usable_ladder()
        if not self.ladder:
            raise CodecError("rate control needs at least one candidate codec")

    @property
    def specs(self) -> list[str]:
        return [c.spec for c in self.ladder]

    def candidates(self, tokens: int, dim: int) -> list[tuple[Codec, tuple[int, int]]]:
        """The ladder's codecs that accept ``[tokens, dim]`` features (e.g. `pool` needs a square
        grid), with their decoded shapes."""
        usable = []
        for codec in self.ladder:
            try:
                usable.append((codec, codec.decoded_shape(tokens, dim)))
            except CodecError:
                continue
        if not usable:
            raise CodecError(f"rate control: no candidate codec accepts features of shape {(tokens, dim)}")
        return usable

    def choose(self, features: torch.Tensor, target: RateTarget) -> RateChoice:
        if not target.active:
            raise CodecError("rate control needs target_bytes > 0 or target_fidelity > 0")
        if features.dim() != 2:
            raise CodecError(f"features must be 2-D [tokens, dim], got shape {tuple(features.shape)}")
        candidates = self.candidates(int(features.shape[0]), int(features.shape[1]))
        if target.min_fidelity > 0:
            return self._by_fidelity(features, candidates, target)
        if self.rungs is not None:
            return self._by_accuracy(features, candidates, target)
        return self._by_bytes(features, candidates, target)

    def _by_accuracy(
        self, features: torch.Tensor, candidates: list[tuple[Codec, tuple[int, int]]], target: RateTarget
    ) -> RateChoice:
        assert self.rungs is not None
        tried: list[tuple[str, int]] = []
        for codec, shape in candidates:  # most accurate first
            payload = codec.encode(features)
            tried.append((codec.spec, len(payload)))
            if len(payload) <= target.max_bytes:
                accuracy = self.rungs[codec.spec].accuracy
                return RateChoice(codec, payload, shape, target, tried=tried, accuracy=accuracy)
        spec, smallest = min(tried, key=lambda t: t[1])
        raise CodecError(
            f"rate control: no codec fits target_bytes={target.max_bytes}; the smallest achievable "
            f"payload for these features is {smallest} B ({spec!r})"
        )

    def _by_bytes(
        self, features: torch.Tensor, candidates: list[tuple[Codec, tuple[int, int]]], target: RateTarget
    ) -> RateChoice:
        tried: list[tuple[str, int]] = []
        payloads: dict[int, bytes] = {}

        def size(i: int) -> int:
            if i not in payloads:
                payloads[i] = candidates[i][0].encode(features)
                tried.append((candidates[i][0].spec, len(payloads[i])))
            return len(payloads[i])

        last = len(candidates) - 1
        if size(last) > target.max_bytes:
            smallest = min(n for _, n in tried)
            raise CodecError(
                f"rate control: no codec fits target_bytes={target.max_bytes}; the smallest achievable "
                f"payload for these features is {smallest} B ({candidates[last][0].spec!r})"
            )
        lo, hi = 0, last  # invariant: candidate hi fits
        while lo < hi:
            mid = (lo + hi) // 2
            if size(mid) <= target.max_bytes:
                hi = mid
            else:
                lo = mid + 1
        codec, shape = candidates[hi]
        return RateChoice(codec, payloads[hi], shape, target, tried=tried)

    def _by_fidelity(
        self, features: torch.Tensor, candidates: list[tuple[Codec, tuple[int, int]]], target: RateTarget
    ) -> RateChoice:
        full = [(c, s) for c, s in candidates if not c.token_reducers]
        if not full:
            raise CodecError("rate control: fidelity mode needs a candidate that keeps every token")
        if self.rungs is not None:
            rungs = self.rungs
            order = sorted(full, key=lambda c: rungs[c[0].spec].mean_bytes)  # smallest measured first
        else:
            order = list(reversed(full))  # smallest nominal payload first
        tried: list[tuple[str, int]] = []
        best = 0.0
        for codec, shape in order:
            payload = codec.encode(features)
            tried.append((codec.spec, len(payload)))
            decoded = codec.decode(payload, shape, dtype=torch.float32)
            fidelity = mean_token_cosine(features.float(), decoded)
            best = max(best, fidelity)
            if fidelity >= target.min_fidelity:
                if target.max_bytes and len(payload) > target.max_bytes:
                    raise CodecError(
                        f"rate control: the smallest payload keeping mean cosine >= {target.min_fidelity:g} "
                        f"is {len(payload)} B ({codec.spec!r}), over target_bytes={target.max_bytes}"
                    )
                accuracy = self.rungs[codec.spec].accuracy if self.rungs is not None else None
                return RateChoice(
                    codec, payload, shape, target, fidelity=fidelity, tried=tried, accuracy=accuracy
                )
        raise CodecError(
            f"rate control: no codec keeps mean per-token cosine >= {target.min_fidelity:g}; "
            f"the best reached is {best:.6f}"
        )
