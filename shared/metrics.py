"""Prometheus metrics shared by both services (one registry per process).

The Rx serves them at ``GET /metrics`` on its HTTP port, the Tx on its own small HTTP
server (``metrics_port``, `serve_metrics`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter(
    "splitvlm_requests_total",
    "Requests served, by service, method and outcome",
    ["service", "method", "code"],
)
PAYLOAD_BYTES = Histogram(
    "splitvlm_payload_bytes",
    "Feature payload bytes per request",
    ["service"],
    buckets=[2**k for k in range(8, 28, 2)],
)
LATENCY = Histogram(
    "splitvlm_request_seconds",
    "End-to-end request latency",
    ["service", "method"],
    buckets=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100],
)
CACHE_EVENTS = Counter("splitvlm_cache_events_total", "Tx packet cache hits and misses", ["event"])
TTFT = Histogram(
    "splitvlm_time_to_first_token_seconds",
    "From the request's arrival to its first generated token",
    ["service"],
    buckets=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30],
)
TOKENS = Counter("splitvlm_tokens_generated_total", "Tokens generated (streamed back)", ["service"])
QUEUE_DEPTH = Gauge(
    "splitvlm_queue_depth",
    "Requests waiting for the model (the Rx's language model, the Tx's vision encoder)",
    ["service"],
)
IN_FLIGHT = Gauge("splitvlm_requests_in_flight", "Requests being served", ["service"])


@dataclass
class MetricsServer:
    """The Tx's /metrics endpoint: prometheus_client's HTTP server in a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsServer:
    """Start serving every metric of this process at http://HOST:PORT/metrics (OSError if taken)."""
    server, thread = start_http_server(port, addr=host)
    return MetricsServer(server, thread)


@contextlib.contextmanager
def queued(service: str, lock: threading.Lock) -> Iterator[None]:
    """Hold ``lock`` for the block, counted in the service's queue depth while waiting for it."""
    waiting = QUEUE_DEPTH.labels(service)
    waiting.inc()
    try:
        lock.acquire()
    finally:
        waiting.dec()
    try:
        yield
    finally:
        lock.release()
