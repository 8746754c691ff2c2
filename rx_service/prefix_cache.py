"""Multi-question reuse: the KV cache of the image prefix, kept per stored feature id.

    prompt = [template head][image tokens][question][assistant tag]
             └────── prefix: same for every question about one feature id ──────┘ (up to the image end)

    first question:  prefill(prefix) ─► KV ─► stored (bounded by bytes, LRU)   then generate the rest
    later questions: copy of the stored KV ─► generate from the question's first token on

Keyed by feature id + model fingerprint + the prefix's token ids (so a template or token-count
change can never reuse a wrong prefix). Generation from a reused prefix is the same
computation as a cold run, split in two forward passes; answers are compared with cold runs
in tests/test_stream_kv_reuse.py. Only Hugging Face halves whose inputs carry `inputs_embeds`
and an `image_token_id` (LLaVA) reuse a prefix; the others generate cold.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import threading
from collections import OrderedDict
from typing import Any

import torch
from prometheus_client import Counter

from shared.split import GenerationOptions, RxHalf, VisionFeatures
from shared.split.base import TokenCallback
from shared.split.llava import _TokenStreamer, generation_kwargs, seeded, truncate_at_stop

KV_EVENTS = Counter(
    "splitvlm_kv_prefix_cache_events_total", "Rx image-prefix KV cache hits and misses", ["event"]
)


def _cache_nbytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _cache_kwarg(model: Any) -> str:
    """`cache` in newer transformers 5.x, `past_key_values` before it was renamed."""
    params = inspect.signature(model.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


class PrefixKVCache:
    """Byte-bounded LRU of image-prefix KV caches (0 bytes disables it)."""

    def __init__(self, max_bytes: int, model_fingerprint: str) -> None:
        self.max_bytes = max_bytes
        self.model_fingerprint = model_fingerprint
        self._entries: OrderedDict[tuple[str, str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def generate(
        self,
        half: RxHalf,
        feature_id: str,
        prompt: str,
        features: VisionFeatures,
        options: GenerationOptions,
        on_token: TokenCallback | None = None,
    ) -> list[int]:
        model: Any = getattr(half, "model", None)
        image_token_id = getattr(half, "image_token_id", None)
        if model is None or image_token_id is None:
            return half.generate(prompt, features, options, on_token=on_token)
        inputs = half.build_inputs(prompt, features)
        input_ids = inputs["input_ids"]
        positions = (input_ids[0] == image_token_id).nonzero()
        if "inputs_embeds" not in inputs or len(positions) == 0:
            return half.generate(prompt, features, options, on_token=on_token)
        prefix_len = int(positions[-1]) + 1
        if prefix_len >= input_ids.shape[1]:
            return half.generate(prompt, features, options, on_token=on_token)
        prefix_ids = input_ids[0, :prefix_len].tolist()
        key = (feature_id, self.model_fingerprint, hashlib.sha256(str(prefix_ids).encode()).hexdigest())
        with torch.inference_mode():
            cache = self._take(key)
            if cache is None:
                out = model(
                    inputs_embeds=inputs["inputs_embeds"][:, :prefix_len],
                    attention_mask=inputs["attention_mask"][:, :prefix_len],
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = getattr(out, "cache", None) or out.past_key_values
                self._put(key, cache)
                cache = copy.deepcopy(cache)
            prompt_len = int(input_ids.shape[1])
            stop_ids: set[int] = getattr(half, "stop_ids", set())
            streamer = _TokenStreamer(on_token, stop_ids) if on_token is not None else None
            device = getattr(half, "device", torch.device("cpu"))
            with seeded(options, device):
                out_ids = model.generate(
                    **inputs, **generation_kwargs(options), **{_cache_kwarg(model): cache}, streamer=streamer
                )
        return truncate_at_stop(out_ids[0, prompt_len:].tolist(), stop_ids)

    def _take(self, key: tuple[str, str, str]) -> Any:
        """A private copy of the cached prefix (generation appends to it), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                KV_EVENTS.labels("miss").inc()
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            KV_EVENTS.labels("hit").inc()
            return copy.deepcopy(entry[0])

    def _put(self, key: tuple[str, str, str], cache: Any) -> None:
        size = _cache_nbytes(cache)
        if size == 0 or size > self.max_bytes:
            return
        stored = copy.deepcopy(cache)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (stored, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
