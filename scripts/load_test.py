"""Load test: N concurrent clients asking a Tx (which forwards to its Rx) for a while.

    python scripts/load_test.py                          # 32 clients x 10 minutes, fresh loopback Rx + Tx
    python scripts/load_test.py --clients 8 --seconds 30
    python scripts/load_test.py --tx HOST:PORT            # against running services

Each client cycles through its own images and prompts (greedy decoding), checks every answer
is complete (a final chunk with `done`) and equal to the answer the same question got when
asked alone before the load started, and records its latency. Reports errors by status code,
lost/wrong answers, throughput, p50/p95/max latency, and the process's RSS over time (in-process
services only).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from shared.errors import RemoteError

PROMPTS = ["What is in the image?", "What color is it?", "Describe the picture."]


@dataclass
class LoadReport:
    clients: int
    seconds: float = 0.0
    answers: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    wrong: int = 0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        lat = self.latencies_s
        lines = [
            f"{self.clients} clients, {self.seconds:.0f} s: {self.answers} answers "
            f"({self.answers / max(self.seconds, 1e-9):.2f}/s), errors {sum(self.errors.values())} "
            f"{dict(self.errors)}, lost or wrong answers {self.wrong}",
        ]
        if lat:
            lines.append(
                f"latency p50 {self.percentile(0.5) * 1e3:.0f} ms, p95 {self.percentile(0.95) * 1e3:.0f} ms, "
                f"max {max(lat) * 1e3:.0f} ms, mean {statistics.fmean(lat) * 1e3:.0f} ms"
            )
        if self.rss_mb:
            values = [v for _, v in self.rss_mb]
            first, last = values[0], values[-1]
            lines.append(f"RSS {first:.0f} MB at start, {last:.0f} MB at end, max {max(values):.0f} MB")
        return "\n".join(lines)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import resource

    return pages * resource.getpagesize() / 2**20


def client_images(client: int, count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(1000 + client)
    return [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(count)]


def run_load(
    tx_address: str,
    clients: int,
    seconds: float | None = None,
    requests_per_client: int | None = None,
    max_new_tokens: int = 8,
    client_kwargs: dict[str, Any] | None = None,
    sample_rss: bool = True,
) -> LoadReport:
    from tx_service.client import TxClient

    kwargs = {"timeout_s": 300.0} | (client_kwargs or {})
    report = LoadReport(clients=clients)
    lock = threading.Lock()
    # Reference answers, each question asked alone (greedy decoding: the answer under load must match).
    work = {
        c: [(img, PROMPTS[i % len(PROMPTS)]) for i, img in enumerate(client_images(c))]
        for c in range(clients)
    }
    expected: dict[tuple[int, int], list[int]] = {}
    with TxClient(tx_address, **kwargs) as tx:
        for c, items in work.items():
            for i, (img, prompt) in enumerate(items):
                expected[(c, i)] = tx.ask(img, prompt, max_new_tokens=max_new_tokens).token_ids
    stop_at = time.monotonic() + seconds if seconds is not None else None
    done = threading.Event()

    def client(c: int) -> None:
        with TxClient(tx_address, **kwargs) as tx:
            n = 0
            while not done.is_set():
                if requests_per_client is not None and n >= requests_per_client:
                    return
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                i = n % len(work[c])
                img, prompt = work[c][i]
                t0 = time.monotonic()
                try:
                    answer = tx.ask(img, prompt, max_new_tokens=max_new_tokens)
                except RemoteError as exc:
                    with lock:
                        report.errors[exc.grpc_code.name] += 1
                else:
                    with lock:
                        report.latencies_s.append(time.monotonic() - t0)
                        report.answers += 1
                        if answer.token_ids != expected[(c, i)]:
                            report.wrong += 1
                n += 1

    def sampler() -> None:
        while not done.wait(1.0):
            report.rss_mb.append((time.monotonic() - started, rss_mb()))

    started = time.monotonic()
    if sample_rss:
        report.rss_mb.append((0.0, rss_mb()))
        threading.Thread(target=sampler, daemon=True).start()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    report.seconds = time.monotonic() - started
    if sample_rss:
        report.rss_mb.append((report.seconds, rss_mb()))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--tx", help="HOST:PORT of a running Tx (default: start Rx + Tx on loopback)")
    args = parser.parse_args()
    running: list[Any] = []
    address = args.tx
    if address is None:
        from rx_service.server import start_rx
        from shared.config import RxSettings, TxSettings
        from tx_service.server import start_tx

        rx = start_rx(
            RxSettings(grpc_port=0, http_port=0, max_queued_requests=max(32, args.clients)), http=False
        )
        tx = start_tx(TxSettings(port=0, rx_address=rx.grpc_address), require_rx=True)
        running = [tx, rx]
        address = tx.address
    try:
        report = run_load(
            address,
            args.clients,
            seconds=args.seconds,
            max_new_tokens=args.max_new_tokens,
            sample_rss=args.tx is None,
        )
    finally:
        for service in running:
            service.stop()
    print(report.summary())
    return 0 if not report.errors and not report.wrong else 1


if __name__ == "__main__":
    sys.exit(main())
