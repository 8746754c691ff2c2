"""The feature store's two backends behave alike: ids, LRU by bytes, TTL, last N frames per stream.

The Redis backend runs against a real redis-server started here on a free loopback port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import redis_server

from rx_service.store import FeatureStore, FrameRef, MemoryFeatureStore, feature_id

Factory = Callable[..., FeatureStore]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Factory]:
    made: list[FeatureStore] = []

    def factory(ttl_s: float = 0.0, frames_per_stream: int = 8, max_bytes: int = 2**20) -> FeatureStore:
        if request.param == "memory":
            store: FeatureStore = MemoryFeatureStore(max_bytes, ttl_s, frames_per_stream)
        else:
            from rx_service.store.redis import RedisFeatureStore

            url = request.getfixturevalue("redis_url")
            prefix = f"t{time.monotonic_ns()}:"  # each test its own key space
            store = RedisFeatureStore(url, ttl_s, frames_per_stream, prefix=prefix)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


def _packet(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


def test_put_get_by_content_id(make_store: Factory) -> None:
    store = make_store()
    fid = store.put(_packet(1))
    assert fid == feature_id(_packet(1)) and len(fid) == 32
    entry = store.get(fid)
    assert entry is not None and entry.packet == _packet(1) and entry.frame is None
    assert store.get("0" * 32) is None


def test_last_n_frames_per_stream_and_latest(make_store: Factory) -> None:
    store = make_store(frames_per_stream=3)
    ids = [store.put(_packet(i), FrameRef("cam1", i, 1000 + i)) for i in range(6)]
    store.put(_packet(100), FrameRef("cam2", 0, 5))
    assert [store.get(i) is not None for i in ids] == [False, False, False, True, True, True]
    latest = store.latest("cam1")
    assert latest is not None and latest.feature_id == ids[-1] and latest.frame == FrameRef("cam1", 5, 1005)
    assert store.latest("nope") is None
    infos = {s.stream_id: s for s in store.streams()}
    assert set(infos) == {"cam1", "cam2"}
    cam1 = infos["cam1"]
    assert (cam1.latest_sequence, cam1.frames_received, cam1.frames_kept) == (5, 6, 3)
    assert cam1.latest_feature_id == ids[-1] and cam1.fps >= 0


def test_ttl_expires_entries(make_store: Factory) -> None:
    store = make_store(ttl_s=0.3)
    fid = store.put(_packet(7), FrameRef("cam1", 0, 0))
    assert store.get(fid) is not None
    time.sleep(0.5)
    assert store.get(fid) is None and store.latest("cam1") is None
    assert store.streams() == []


def test_memory_store_evicts_least_recently_used_by_bytes() -> None:
    store = MemoryFeatureStore(max_bytes=1000, ttl_s=0, frames_per_stream=100)
    ids = [store.put(_packet(i, 300)) for i in range(3)]  # 900 bytes
    assert store.get(ids[0]) is not None  # touch: ids[1] is now the least recently used
    new = store.put(_packet(9, 300))  # over 1000 bytes: one eviction, never an error
    assert store.get(ids[1]) is None
    assert all(store.get(i) is not None for i in (ids[0], ids[2], new))
    assert store.stats()["bytes"] <= 1000 and store.stats()["evicted"] == 1
    assert store.put(_packet(1, 5000)) and store.stats()["bytes"] <= 1000  # larger than the store: not kept


def test_redis_store_is_shared_and_outlives_its_client(redis_url: str) -> None:
    from rx_service.store.redis import RedisFeatureStore

    first = RedisFeatureStore(redis_url, 0, 8, prefix="shared-test:")
    fid = first.put(_packet(3), FrameRef("cam9", 4, 44))
    first.close()  # the Rx that stored it is gone
    second = RedisFeatureStore(redis_url, 0, 8, prefix="shared-test:")  # a replica, or the restarted Rx
    entry = second.get(fid)
    assert entry is not None and entry.packet == _packet(3) and entry.frame == FrameRef("cam9", 4, 44)
    latest = second.latest("cam9")
    assert latest is not None and latest.feature_id == fid
    second.close()


def test_redis_full_store_evicts_instead_of_refusing(tmp_path: Path) -> None:
    from rx_service.store.redis import RedisFeatureStore

    with redis_server(tmp_path, maxmemory="4mb") as url:
        store = RedisFeatureStore(url, 0, 10_000)
        ids = [store.put(_packet(i, 100_000), FrameRef("cam1", i, i)) for i in range(100)]  # ~10 MB
        kept = [i for i in ids if store.get(i) is not None]
        assert 0 < len(kept) < len(ids)
        assert store.get(ids[-1]) is not None  # the newest survives; the oldest went first
        assert store.stats()["evicted"] > 0
        store.close()
