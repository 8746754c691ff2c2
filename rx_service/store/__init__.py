"""The Rx feature store: `FeatureStore` with an in-memory (default) and a Redis backend."""

from __future__ import annotations

from rx_service.store.base import (
    FeatureNotFoundError,
    FeatureStore,
    FrameRef,
    StoredPacket,
    StreamInfo,
    check_stream_id,
    feature_id,
)
from rx_service.store.memory import MemoryFeatureStore
from shared.config import RxSettings

__all__ = [
    "FeatureNotFoundError",
    "FeatureStore",
    "FrameRef",
    "MemoryFeatureStore",
    "StoredPacket",
    "StreamInfo",
    "check_stream_id",
    "feature_id",
    "open_store",
]


def open_store(settings: RxSettings) -> FeatureStore:
    """The backend `settings.store` names (`memory` or `redis`)."""
    if settings.store == "redis":
        from rx_service.store.redis import RedisFeatureStore

        return RedisFeatureStore(
            settings.store_redis_url, settings.store_ttl_s, settings.store_frames_per_stream
        )
    return MemoryFeatureStore(
        settings.store_max_bytes, settings.store_ttl_s, settings.store_frames_per_stream
    )
