"""Prometheus metrics shared by both services (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
