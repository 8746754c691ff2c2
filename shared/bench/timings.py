"""Per-stage timing samples (milliseconds) and their summaries."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100), linear interpolation between order statistics; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def summary(values: Sequence[float]) -> dict[str, float]:
    """{median, p95, mean, n} of `values` (nan statistics for no samples)."""
    n = len(values)
    return {
        "median": median(values),
        "p95": percentile(values, 95.0),
        "mean": sum(values) / n if n else math.nan,
        "n": n,
    }


@dataclass
class StageTimes:
    """Samples in ms per stage name, in the order stages were first recorded."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.samples.setdefault(stage, []).append(float(ms))

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, (time.perf_counter() - start) * 1e3)

    def median(self, stage: str) -> float:
        return median(self.samples.get(stage, []))

    def summary(self) -> dict[str, dict[str, float]]:
        return {stage: summary(values) for stage, values in self.samples.items()}
