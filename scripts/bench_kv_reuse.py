"""Time to first token for ten questions about one stored feature id: the first builds the image
prefix's KV cache, the 2nd-10th reuse it (rx_service/prefix_cache.py).

    python scripts/bench_kv_reuse.py [--model builtin:tiny-llava] [--codec lossless] [--repeats 5]
                                     [--threads 1]

For each question it times, through RxEngine.generate (what Query and the Rx chat completions
call), the first generated token with the prefix cache (feature id given) and without it (cold),
and checks that both answers have the same tokens. Medians over --repeats runs, each run on a
fresh cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image, ImageDraw

from rx_service.engine import RxEngine
from rx_service.prefix_cache import PrefixKVCache
from shared.config import RxSettings, TxSettings
from shared.models.registry import DEFAULT_MODEL
from shared.protocol import pb
from shared.split import GenerationOptions
from tx_service.engine import TxEngine

QUESTIONS = [
    "What is in the image?",
    "What color is the circle?",
    "How many shapes are there?",
    "Is there a square?",
    "Where is the triangle?",
    "What shape is on the left?",
    "Is the star above the circle?",
    "What color is the background?",
    "Describe the picture in a few words.",
    "Which object is largest?",
]


def ttft_ms(
    engine: RxEngine, header: pb.FeatureHeader, payload: bytes, prompt: str, feature_id: str
) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    first = None
    ids: list[int] = []
    for chunk in engine.generate(
        header, payload, prompt, GenerationOptions(max_new_tokens=8), feature_id=feature_id
    ):
        if first is None and chunk.token_ids:
            first = (time.perf_counter() - t0) * 1e3
        ids.extend(chunk.token_ids)
    return (first if first is not None else (time.perf_counter() - t0) * 1e3), ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--codec", default="lossless")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rx = RxEngine.load(RxSettings(model=args.model))
    tx = TxEngine.load(TxSettings(model=args.model))
    image = Image.new("RGB", (224, 224), (40, 120, 200))
    ImageDraw.Draw(image).ellipse([40, 40, 120, 120], fill=(220, 30, 30))
    encoded = tx.encode(image, args.codec)
    warm: list[list[float]] = [[] for _ in QUESTIONS]
    cold: list[list[float]] = [[] for _ in QUESTIONS]
    mismatches = 0
    for r in range(args.repeats):
        rx.kv_cache = PrefixKVCache(256 * 2**20, rx.fingerprint)  # a fresh cache each run
        fid = f"{r:032x}"
        for i, q in enumerate(QUESTIONS):
            t_warm, ids_warm = ttft_ms(rx, encoded.header, encoded.payload, q, fid)
            t_cold, ids_cold = ttft_ms(rx, encoded.header, encoded.payload, q, "")
            warm[i].append(t_warm)
            cold[i].append(t_cold)
            mismatches += ids_warm != ids_cold
    print(
        f"model {args.model}, codec {args.codec}, {encoded.header.shape[0]} visual tokens, "
        f"{args.threads} thread(s), median of {args.repeats} runs"
    )
    print(f"{'question':>8} {'TTFT with prefix cache':>24} {'TTFT cold':>10}")
    for i in range(len(QUESTIONS)):
        print(f"{i + 1:>8} {statistics.median(warm[i]):>21.1f} ms {statistics.median(cold[i]):>7.1f} ms")
    first = statistics.median(warm[0])
    later = statistics.median([t for row in warm[1:] for t in row])
    cold_later = statistics.median([t for row in cold[1:] for t in row])
    print(
        f"first question {first:.1f} ms; questions 2-10 {later:.1f} ms (median): {first / later:.2f}x lower; "
        f"cold questions 2-10 {cold_later:.1f} ms: {cold_later / later:.2f}x"
    )
    total = len(QUESTIONS) * args.repeats
    print(f"answers identical to cold runs: {total - mismatches}/{total}")


if __name__ == "__main__":
    main()
