"""The Tx packet cache: bounded by bytes, LRU, keyed by image content + fingerprints."""

from __future__ import annotations

from shared.protocol import pb
from tx_service.cache import PacketCache, cache_key


def _header(request_id: str = "r") -> pb.FeatureHeader:
    return pb.FeatureHeader(format_version=1, request_id=request_id, shape=[4, 8])


def test_hits_misses_and_key_parts() -> None:
    cache = PacketCache(max_bytes=10_000)
    key = cache_key(b"image-1", "sha256:model", "sha256:codec")
    assert cache.get(key) is None
    cache.put(key, _header(), b"x" * 100)
    hit = cache.get(key)
    assert hit is not None and hit.payload == b"x" * 100
    assert cache.get(cache_key(b"image-2", "sha256:model", "sha256:codec")) is None
    assert cache.get(cache_key(b"image-1", "sha256:other", "sha256:codec")) is None
    assert cache.get(cache_key(b"image-1", "sha256:model", "sha256:other")) is None
    assert (cache.hits, cache.misses) == (1, 4)


def test_bounded_by_bytes_with_lru_eviction() -> None:
    cache = PacketCache(max_bytes=1_000)
    keys = [cache_key(bytes([i]), "m", "c") for i in range(5)]
    for key in keys[:3]:
        cache.put(key, _header(), b"p" * 300)
    assert cache.get(keys[0]) is not None  # keys[0] is now the most recently used
    cache.put(keys[3], _header(), b"p" * 300)
    assert cache.nbytes <= 1_000
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    cache.put(keys[4], _header(), b"p" * 5_000)  # larger than the cache: not stored
    assert cache.get(keys[4]) is None and cache.nbytes <= 1_000


def test_cached_header_is_a_copy() -> None:
    cache = PacketCache(max_bytes=10_000)
    key = cache_key(b"img", "m", "c")
    header = _header("first")
    cache.put(key, header, b"abc")
    header.request_id = "mutated"
    entry = cache.get(key)
    assert entry is not None and entry.header.request_id == "first"
