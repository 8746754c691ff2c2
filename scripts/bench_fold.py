"""Benchmark compressed-domain decoding: pca decode + the projector's linear_1 vs the folded Linear.

    OMP_NUM_THREADS=1 python scripts/bench_fold.py [--tokens 576 --dim 1024 --hidden 4096 --k 64]

Prints the analytic multiply-adds of the first layer, the median times of
(1) the linear maps alone (z W + b then linear_1, vs the folded Linear), and
(2) the whole Rx path from payload to linear_1's output with ``pca:k|int8|zstd``
(`Codec.decode` then linear_1, vs `Codec.decode_compact` then the folded Linear),
plus the one-off cost of folding. Random weights: the timings depend only on the shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from shared.codecs import build_codec
from shared.codecs.calibrate import fit_stages
from shared.codecs.fold import flops, fold


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    t, d, h, k = args.tokens, args.dim, args.hidden, args.k
    torch.manual_seed(0)

    # Vision-encoder-like features: a low-rank part plus noise, to calibrate pca on.
    basis = torch.randn(2 * k, d)
    samples = [torch.randn(t, 2 * k) @ basis + 0.1 * torch.randn(t, d) for _ in range(4)]
    spec = f"pca:k={k}|int8|zstd"
    codec = build_codec(spec, artifact=fit_stages(spec, samples))
    linear_1 = torch.nn.Linear(d, h).eval().requires_grad_(False)
    decoder = codec.linear_decoder()
    assert decoder is not None
    w, b = decoder

    t0 = time.perf_counter()
    folded = fold(decoder, linear_1)
    fold_ms = (time.perf_counter() - t0) * 1e3

    x = torch.randn(t, 2 * k) @ basis + 0.1 * torch.randn(t, d)
    payload = codec.encode(x)
    z, _ = codec.decode_compact(payload, (t, d))

    with torch.inference_mode():
        ref = linear_1(codec.decode(payload, (t, d)))
        err = float((folded(z) - ref).abs().max() / ref.abs().max())
        unfolded_mm = median_ms(lambda: linear_1(torch.addmm(b, z, w)), args.repeats)
        folded_mm = median_ms(lambda: folded(z), args.repeats)
        unfolded_rx = median_ms(lambda: linear_1(codec.decode(payload, (t, d))), args.repeats)
        folded_rx = median_ms(lambda: folded(codec.decode_compact(payload, (t, d))[0]), args.repeats)

    before, after = flops(t, k, d, h)
    print(f"shape: tokens={t} D={d} H={h} k={k}  codec {codec.spec}  threads={torch.get_num_threads()}")
    row("multiply-adds", before / 1e9, after / 1e9, "G")
    row("linear maps", unfolded_mm, folded_mm, "ms")
    row("payload->h", unfolded_rx, folded_rx, "ms")
    print(f"one-off fold: {fold_ms:.1f} ms;  max relative error of h: {err:.2e}")


def row(label: str, unfolded: float, folded: float, unit: str) -> None:
    print(
        f"{label + ':':15}decode+linear_1 {unfolded:8.3f} {unit}  folded {folded:8.3f} {unit}  "
        f"({unfolded / folded:.1f}x)"
    )


if __name__ == "__main__":
    main()
