"""The Rx feature store interface: validated packets kept by id, and the last frames per stream.

    POST /v1/features ─┐                          ┌─► GET /v1/streams
    RxService.Publish ─┴─► FeatureStore.put ─► id ┴─► get(id) / latest(stream) ─► Query, chat completions

Entries are serialized `FeaturePacket`s, validated by the Rx before they are stored
(`rx_service.streams.check_packet`), so a reader only re-parses them. A feature id is the
content hash of the packet (the same packet uploaded twice gets one id). Backends bound
what they keep: by bytes (least recently used first), by age (TTL), and per stream (the last
N frames); a full store evicts, it never refuses a publisher.
"""

from __future__ import annotations

import hashlib
import re
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from shared.errors import BadRequestError, SplitVlmError

STORE_EVENTS = Counter(
    "splitvlm_feature_store_events_total",
    "Rx feature store puts, hits, misses, evictions",
    ["backend", "event"],
)
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FEATURE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def feature_id(packet: bytes) -> str:
    """The id of a serialized packet: the first 128 bits of its sha256, hex."""
    return hashlib.sha256(packet).hexdigest()[:32]


def check_stream_id(stream_id: str) -> str:
    if not STREAM_ID_RE.match(stream_id):
        raise BadRequestError(
            f"stream id {stream_id[:80]!r} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -"
        )
    return stream_id


@dataclass(frozen=True)
class FrameRef:
    """Where a stored packet came from (absent for direct uploads)."""

    stream_id: str
    sequence: int
    capture_unix_ms: int


@dataclass(frozen=True)
class StoredPacket:
    feature_id: str
    packet: bytes  # a serialized FeaturePacket, validated when it was stored
    stored_unix_ms: int
    frame: FrameRef | None = None


@dataclass
class StreamInfo:
    """One stream as `GET /v1/streams` shows it."""

    stream_id: str
    latest_feature_id: str
    latest_sequence: int
    latest_capture_unix_ms: int
    latest_received_unix_ms: int
    frames_received: int
    frames_kept: int
    fps: float  # frames received per second over the recent window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def now_ms() -> int:
    return int(time.time() * 1000)


class FeatureStore(ABC):
    """Where the Rx keeps validated packets. Thread-safe."""

    kind: str = ""

    @abstractmethod
    def put(self, packet: bytes, frame: FrameRef | None = None) -> str:
        """Store a validated serialized packet; returns its feature id. Evicts, never refuses."""

    @abstractmethod
    def get(self, feature_id: str) -> StoredPacket | None:
        """The packet stored under `feature_id`, or None (unknown, expired or evicted)."""

    @abstractmethod
    def latest(self, stream_id: str) -> StoredPacket | None:
        """The newest frame still stored for `stream_id`, or None."""

    @abstractmethod
    def streams(self) -> list[StreamInfo]:
        """Every stream with a frame still stored, by id."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Entries, bytes and evictions, for metrics and /v1/streams."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (Redis)."""


class FeatureNotFoundError(SplitVlmError):
    """No stored features under that id (never stored, expired or evicted), or no such stream."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
