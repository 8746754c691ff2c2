"""Benchmark compressed-domain decoding: pca / sparse decode + the projector's linear_1 vs the folded decoder.

    OMP_NUM_THREADS=1 python scripts/bench_fold.py [--tokens 576 --dim 1024 --hidden 4096 --k 64
                                                    --atoms 256 --nnz 8]

For ``pca:k=K|int8|zstd`` and ``sparse:atoms=A,k=NNZ|int8|zstd`` prints the
analytic multiply-adds of the first layer, the median times of (1) the linear
maps alone (decode the code then linear_1, vs the folded decoder), and (2) the
whole Rx path from payload to linear_1's output (`Codec.decode` then linear_1,
vs `Codec.decode_compact` then the folded decoder), plus the one-off cost of
folding. For sparse it also shows the folded decoder applied as a dense
[T, atoms] matmul instead of gathering k atoms per token. Random weights (and a
random unit-norm dictionary for sparse): the timings depend only on the shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from shared.codecs import build_codec
from shared.codecs.calibrate import fit_stages, parse_stages
from shared.codecs.calibration import CalibrationArtifact, tensor_key
from shared.codecs.fold import CompactCode, flops, fold
from shared.codecs.pipeline import Codec


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sparse_codec(spec: str, atoms: int, dim: int) -> Codec:
    """The sparse codec with a random unit-norm dictionary (fitting one would only cost time)."""
    canonical, stages = parse_stages(spec)
    dictionary = torch.randn(atoms, dim)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    tensors = {
        tensor_key(0, stages[0], "atoms"): dictionary.contiguous(),
        tensor_key(0, stages[0], "mean"): 0.1 * torch.randn(dim),
    }
    described = [{"index": 0, "name": stages[0].name, "spec": stages[0].spec}]
    return build_codec(spec, artifact=CalibrationArtifact(spec=canonical, tensors=tensors, stages=described))


def bench(codec: Codec, x: torch.Tensor, linear_1: torch.nn.Linear, k: int, repeats: int) -> None:
    t, d = (int(n) for n in x.shape)
    h = linear_1.out_features
    decoder = codec.linear_decoder()
    assert decoder is not None
    w, b = decoder
    rows = int(w.shape[0])

    t0 = time.perf_counter()
    folded = fold(decoder, linear_1)
    fold_ms = (time.perf_counter() - t0) * 1e3

    payload = codec.encode(x)
    code, _ = codec.decode_compact(payload, (t, d))
    dense = CompactCode(code.dense(rows))

    with torch.inference_mode():
        ref = linear_1(codec.decode(payload, (t, d)))
        err = float((folded(code) - ref).abs().max() / ref.abs().max())
        unfolded_mm = median_ms(lambda: linear_1(code.apply(w, b)), repeats)
        folded_mm = median_ms(lambda: folded(code), repeats)
        unfolded_rx = median_ms(lambda: linear_1(codec.decode(payload, (t, d))), repeats)
        folded_rx = median_ms(lambda: folded(codec.decode_compact(payload, (t, d))[0]), repeats)
        dense_mm = median_ms(lambda: folded(dense), repeats) if code.indices is not None else 0.0

    before, after = flops(t, k, d, h)
    print(f"{codec.spec}: tokens={t} D={d} H={h} k={k} rows={rows}  payload {len(payload):,} B")
    row("multiply-adds", before / 1e9, after / 1e9, "G")
    if code.indices is not None:
        print(f"{'':15}(folded as a dense [T, {rows}] matmul: {t * rows * h / 1e9:.3f} G)")
    row("linear maps", unfolded_mm, folded_mm, "ms")
    if code.indices is not None:
        print(f"{'':15}(folded as a dense [T, {rows}] matmul: {dense_mm:.3f} ms)")
    row("payload->h", unfolded_rx, folded_rx, "ms")
    print(f"{'':15}one-off fold: {fold_ms:.1f} ms;  max relative error of h: {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64, help="pca components")
    parser.add_argument("--atoms", type=int, default=256, help="sparse dictionary size")
    parser.add_argument("--nnz", type=int, default=8, help="sparse non-zeros per token")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    t, d, h, k = args.tokens, args.dim, args.hidden, args.k
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()}")

    # Vision-encoder-like features: a low-rank part plus noise, to calibrate pca on.
    basis = torch.randn(2 * k, d)
    samples = [torch.randn(t, 2 * k) @ basis + 0.1 * torch.randn(t, d) for _ in range(4)]
    spec = f"pca:k={k}|int8|zstd"
    pca = build_codec(spec, artifact=fit_stages(spec, samples))
    linear_1 = torch.nn.Linear(d, h).eval().requires_grad_(False)
    x = torch.randn(t, 2 * k) @ basis + 0.1 * torch.randn(t, d)
    bench(pca, x, linear_1, k, args.repeats)

    sparse = sparse_codec(f"sparse:atoms={args.atoms},k={args.nnz}|int8|zstd", args.atoms, d)
    bench(sparse, x, linear_1, args.nnz, args.repeats)


def row(label: str, unfolded: float, folded: float, unit: str) -> None:
    print(
        f"{label + ':':15}decode+linear_1 {unfolded:8.3f} {unit}  folded {folded:8.3f} {unit}  "
        f"({unfolded / folded:.1f}x)"
    )


if __name__ == "__main__":
    main()
