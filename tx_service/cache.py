"""A byte-bounded LRU cache of compressed packets on the Tx.

    image bytes ─sha256─┐
    model fingerprint ──┼─► key ─► (header, payload)      hit: skip processor, encoder and codec
    codec fingerprint ──┘

Keyed by content, like vLLM's encoder cache: the same image (a parked robot's
view, a re-asked question) is encoded once per model and codec. The bound counts
payload plus serialized header bytes; the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from shared.metrics import CACHE_EVENTS
from shared.protocol import pb

CacheKey = tuple[str, str, str]


def cache_key(image_bytes: bytes, model_fingerprint: str, codec_fingerprint: str) -> CacheKey:
    return (hashlib.sha256(image_bytes).hexdigest(), model_fingerprint, codec_fingerprint)


@dataclass
class CachedPacket:
    header: pb.FeatureHeader
    payload: bytes
    source_bytes: int = 0  # the raw features' size before the codec (for ratios)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + self.header.ByteSize()


class PacketCache:
    """Thread-safe LRU of packets, at most `max_bytes` in total (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, CachedPacket] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> CachedPacket | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                CACHE_EVENTS.labels("miss").inc()
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            CACHE_EVENTS.labels("hit").inc()
            return entry

    def put(self, key: CacheKey, header: pb.FeatureHeader, payload: bytes, source_bytes: int = 0) -> None:
        entry = CachedPacket(header=_copy(header), payload=payload, source_bytes=source_bytes)
        if entry.nbytes > self.max_bytes:
            return  # larger than the whole cache: never stored
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


def _copy(header: pb.FeatureHeader) -> pb.FeatureHeader:
    """Headers are mutated per request (request id); the cache keeps its own."""
    out = pb.FeatureHeader()
    out.CopyFrom(header)
    return out
