"""In-memory feature store (the default): one process, lost on restart.

    put ─► OrderedDict[id → packet]  (LRU order; bounded by bytes and TTL)
       └─► per stream: deque of its last N ids (older frames evicted)

Eviction is by bytes (least recently used first), by age (TTL, checked on access and on
put) and per stream (only the last `frames_per_stream` frames are kept).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from rx_service.store.base import (
    STORE_EVENTS,
    FeatureStore,
    FrameRef,
    StoredPacket,
    StreamInfo,
    feature_id,
    now_ms,
)

_RATE_WINDOW = 16  # receive times kept per stream for its frame rate


@dataclass
class _Stream:
    ids: deque[str] = field(default_factory=deque)
    received: int = 0
    recent_ms: deque[int] = field(default_factory=lambda: deque(maxlen=_RATE_WINDOW))
    latest: StoredPacket | None = None


class MemoryFeatureStore(FeatureStore):
    kind = "memory"

    def __init__(self, max_bytes: int, ttl_s: float, frames_per_stream: int) -> None:
        self.max_bytes = max_bytes
        self.ttl_ms = int(ttl_s * 1000)
        self.frames_per_stream = frames_per_stream
        self._entries: OrderedDict[str, StoredPacket] = OrderedDict()  # least recently used first
        self._by_age: OrderedDict[str, int] = OrderedDict()  # id -> stored time, oldest first
        self._streams: dict[str, _Stream] = {}
        self._bytes = 0
        self._evicted = 0
        self._lock = threading.Lock()

    def put(self, packet: bytes, frame: FrameRef | None = None) -> str:
        fid = feature_id(packet)
        now = now_ms()
        entry = StoredPacket(feature_id=fid, packet=packet, stored_unix_ms=now, frame=frame)
        with self._lock:
            self._drop(fid)
            if len(packet) <= self.max_bytes:
                self._entries[fid] = entry
                self._by_age[fid] = now
                self._bytes += len(packet)
            if frame is not None:
                stream = self._streams.setdefault(frame.stream_id, _Stream())
                stream.received += 1
                stream.recent_ms.append(now)
                stream.latest = entry
                if fid in stream.ids:  # an identical frame again: keep one copy, as the newest
                    stream.ids.remove(fid)
                stream.ids.append(fid)
                while len(stream.ids) > self.frames_per_stream:
                    self._evict(stream.ids.popleft())
            self._expire(now)
            while self._bytes > self.max_bytes and self._entries:
                self._evict(next(iter(self._entries)))
        STORE_EVENTS.labels(self.kind, "put").inc()
        return fid

    def get(self, feature_id: str) -> StoredPacket | None:
        with self._lock:
            self._expire(now_ms())
            entry = self._entries.get(feature_id)
            if entry is not None:
                self._entries.move_to_end(feature_id)
        STORE_EVENTS.labels(self.kind, "hit" if entry else "miss").inc()
        return entry

    def latest(self, stream_id: str) -> StoredPacket | None:
        with self._lock:
            self._expire(now_ms())
            stream = self._streams.get(stream_id)
            if stream is None:
                return None
            for fid in reversed(stream.ids):
                entry = self._entries.get(fid)
                if entry is not None:
                    self._entries.move_to_end(fid)
                    return entry
        return None

    def streams(self) -> list[StreamInfo]:
        with self._lock:
            self._expire(now_ms())
            out = []
            for sid, stream in sorted(self._streams.items()):
                kept = [fid for fid in stream.ids if fid in self._entries]
                if not kept or stream.latest is None or stream.latest.frame is None:
                    continue
                frame = stream.latest.frame
                out.append(
                    StreamInfo(
                        stream_id=sid,
                        latest_feature_id=stream.latest.feature_id,
                        latest_sequence=frame.sequence,
                        latest_capture_unix_ms=frame.capture_unix_ms,
                        latest_received_unix_ms=stream.latest.stored_unix_ms,
                        frames_received=stream.received,
                        frames_kept=len(kept),
                        fps=_fps(list(stream.recent_ms)),
                    )
                )
            return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "evicted": self._evicted}

    # ---- under the lock ----------------------------------------------------
    def _drop(self, fid: str) -> None:
        old = self._entries.pop(fid, None)
        self._by_age.pop(fid, None)
        if old is not None:
            self._bytes -= len(old.packet)

    def _evict(self, fid: str) -> None:
        if fid in self._entries:
            self._drop(fid)
            self._evicted += 1
            STORE_EVENTS.labels(self.kind, "evict").inc()

    def _expire(self, now: int) -> None:
        if self.ttl_ms <= 0:
            return
        while self._by_age:
            fid, stored = next(iter(self._by_age.items()))
            if now - stored <= self.ttl_ms:
                break
            self._evict(fid)
        for sid, stream in list(self._streams.items()):
            if stream.latest is not None and now - stream.latest.stored_unix_ms > self.ttl_ms:
                del self._streams[sid]


def _fps(times_ms: list[int]) -> float:
    if len(times_ms) < 2 or times_ms[-1] == times_ms[0]:
        return 0.0
    return round((len(times_ms) - 1) * 1000.0 / (times_ms[-1] - times_ms[0]), 3)
