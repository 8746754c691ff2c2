"""Redis feature store: several Rx replicas share it, and it outlives an Rx restart.

    put ─► MULTI: HSET {p}f:<id> packet,meta  PEXPIRE ttl
                  LPUSH {p}s:<stream>:ids <id>  LTRIM to the last N  (older frames deleted)
                  HSET {p}s:<stream> latest…  HINCRBY received  LPUSH {p}s:<stream>:t now
                  SADD {p}streams <stream>
    get ─► HGETALL {p}f:<id>

Bounded by bytes through the Redis server itself: run it with `maxmemory` and an LRU
policy (`allkeys-lru`), and Redis evicts the least recently used packets when it is full
(a publisher never sees an error). The Rx logs a warning at start-up when the server has
no memory bound or a policy that refuses writes. TTL is a key expiry; the per-stream bound
trims the stream's id list and deletes what falls off.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from rx_service.store.base import (
    STORE_EVENTS,
    FeatureStore,
    FrameRef,
    StoredPacket,
    StreamInfo,
    feature_id,
    now_ms,
)
from rx_service.store.memory import _fps
from shared.errors import UpstreamError

log = logging.getLogger("splitvlm.rx")

_RATE_WINDOW = 16


class RedisFeatureStore(FeatureStore):
    kind = "redis"

    def __init__(self, url: str, ttl_s: float, frames_per_stream: int, prefix: str = "splitvlm:") -> None:
        self.url = url
        self.ttl_ms = int(ttl_s * 1000)
        self.frames_per_stream = frames_per_stream
        self.prefix = prefix
        # Any: redis-py's stubs type replies as bytes | str whatever decode_responses says.
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise UpstreamError(f"feature store: cannot reach Redis at {url} ({exc})") from None
        self._check_memory_policy()

    def _check_memory_policy(self) -> None:
        try:
            conf: Any = self._redis.config_get("maxmemory*")
        except redis.RedisError:  # CONFIG may be disabled on managed servers
            return
        if str(conf.get(b"maxmemory", conf.get("maxmemory", "0"))) in ("0", "b'0'"):
            log.warning("Redis at %s has no maxmemory: the feature store is bounded only by TTL", self.url)
        policy = conf.get(b"maxmemory-policy", conf.get("maxmemory-policy", b""))
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and "lru" not in policy and "lfu" not in policy:
            log.warning(
                "Redis at %s uses maxmemory-policy %s; use allkeys-lru so a full store evicts",
                self.url,
                policy,
            )

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def put(self, packet: bytes, frame: FrameRef | None = None) -> str:
        fid = feature_id(packet)
        now = now_ms()
        fields: dict[str, Any] = {"packet": packet, "stored_ms": now}
        if frame is not None:
            fields.update(stream=frame.stream_id, seq=frame.sequence, capture_ms=frame.capture_unix_ms)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._k("f", fid), mapping=fields)
            if self.ttl_ms > 0:
                pipe.pexpire(self._k("f", fid), self.ttl_ms)
            if frame is not None:
                sid = frame.stream_id
                ids, times, info = self._k("s", sid, "ids"), self._k("s", sid, "t"), self._k("s", sid)
                pipe.lrem(ids, 0, fid)
                pipe.lpush(ids, fid)
                pipe.lrange(ids, self.frames_per_stream, -1)
                pipe.ltrim(ids, 0, self.frames_per_stream - 1)
                pipe.lpush(times, now)
                pipe.ltrim(times, 0, _RATE_WINDOW - 1)
                pipe.hset(
                    info,
                    mapping={
                        "latest": fid,
                        "seq": frame.sequence,
                        "capture_ms": frame.capture_unix_ms,
                        "received_ms": now,
                    },
                )
                pipe.hincrby(info, "received", 1)
                pipe.sadd(self._k("streams"), sid)
                if self.ttl_ms > 0:
                    for key in (ids, times, info):
                        pipe.pexpire(key, self.ttl_ms)
            results = pipe.execute()
            if frame is not None:
                overflow = results[4 if self.ttl_ms > 0 else 3]  # the LRANGE above
                if overflow:
                    self._redis.delete(*(self._k("f", old.decode()) for old in overflow))
                    STORE_EVENTS.labels(self.kind, "evict").inc(len(overflow))
        except redis.RedisError as exc:
            raise UpstreamError(f"feature store (Redis {self.url}) failed: {exc}") from None
        STORE_EVENTS.labels(self.kind, "put").inc()
        return fid

    def get(self, feature_id: str) -> StoredPacket | None:
        try:
            raw = self._redis.hgetall(self._k("f", feature_id))
        except redis.RedisError as exc:
            raise UpstreamError(f"feature store (Redis {self.url}) failed: {exc}") from None
        STORE_EVENTS.labels(self.kind, "hit" if raw else "miss").inc()
        return _stored(feature_id, raw) if raw else None

    def latest(self, stream_id: str) -> StoredPacket | None:
        try:
            ids = self._redis.lrange(self._k("s", stream_id, "ids"), 0, -1)
        except redis.RedisError as exc:
            raise UpstreamError(f"feature store (Redis {self.url}) failed: {exc}") from None
        for fid in ids:  # newest first; a frame may have been evicted under memory pressure
            entry = self.get(fid.decode())
            if entry is not None:
                return entry
        return None

    def streams(self) -> list[StreamInfo]:
        out = []
        try:
            for raw_sid in sorted(self._redis.smembers(self._k("streams"))):
                sid = raw_sid.decode()
                info = self._redis.hgetall(self._k("s", sid))
                ids = self._redis.lrange(self._k("s", sid, "ids"), 0, -1)
                kept = sum(self._redis.exists(self._k("f", i.decode())) for i in ids)
                if not info or not kept:
                    self._redis.srem(self._k("streams"), sid)
                    continue
                times = [int(t) for t in self._redis.lrange(self._k("s", sid, "t"), 0, -1)]
                out.append(
                    StreamInfo(
                        stream_id=sid,
                        latest_feature_id=info[b"latest"].decode(),
                        latest_sequence=int(info[b"seq"]),
                        latest_capture_unix_ms=int(info[b"capture_ms"]),
                        latest_received_unix_ms=int(info[b"received_ms"]),
                        frames_received=int(info.get(b"received", 0)),
                        frames_kept=int(kept),
                        fps=_fps(sorted(times)),
                    )
                )
        except redis.RedisError as exc:
            raise UpstreamError(f"feature store (Redis {self.url}) failed: {exc}") from None
        return out

    def stats(self) -> dict[str, int]:
        try:
            memory: Any = self._redis.info("memory")
            stats: Any = self._redis.info("stats")
        except redis.RedisError:
            return {}
        return {"bytes": int(memory.get("used_memory", 0)), "evicted": int(stats.get("evicted_keys", 0))}

    def close(self) -> None:
        self._redis.close()


def _stored(fid: str, raw: dict[bytes, bytes]) -> StoredPacket:
    frame = None
    if b"stream" in raw:
        frame = FrameRef(raw[b"stream"].decode(), int(raw[b"seq"]), int(raw[b"capture_ms"]))
    return StoredPacket(
        feature_id=fid, packet=raw[b"packet"], stored_unix_ms=int(raw[b"stored_ms"]), frame=frame
    )
