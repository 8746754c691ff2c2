"""The Rx engine: check a packet, decode it, run connector + LLM, stream text.

Both front ends (gRPC in `grpc_server`, HTTP in `http_app`) call `RxEngine`, so
a packet gets the same checks and the same errors whichever way it arrives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rx_service.codec_policy import CodecPolicy
from rx_service.context import prompt_tokens
from rx_service.limits import check_token_budget
from shared import __version__
from shared.admission import Admission, RequestTimeoutError
from shared.codecs import Codec
from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.fold import FoldCache
from shared.config import RxSettings
from shared.errors import BadRequestError, FingerprintMismatchError
from shared.metrics import QUEUE_DEPTH
from shared.models.card import model_notice
from shared.models.registry import model_fingerprint, resolve_model
from shared.protocol import pb
from shared.protocol.packet import (
    SUPPORTED_FORMAT_VERSIONS,
    features_from_payload,
    header_dtype,
    header_meta,
    raw_feature_bytes,
    split_point_from_pb,
    split_point_to_pb,
    validate_header,
    verify_payload,
)
from shared.split import GenerationOptions, RxHalf, VisionFeatures, check_codec_support, load_rx_half
from shared.textstream import IncrementalDetokenizer

log = logging.getLogger("splitvlm.rx")


@dataclass
class RxEngine:
    settings: RxSettings
    half: RxHalf
    model_id: str
    fingerprint: str
    architecture: str = ""
    notice: str = ""
    # Calibration artifacts for this model by canonical codec spec: settings.codec_artifacts, then
    # the cache dir's and the checkpoint's codecs/ folders (shared/codecs/artifacts.py).
    artifacts: ArtifactIndex = field(default_factory=lambda: ArtifactIndex(""))
    # The accepted codecs (settings.codecs + artifacts); built from settings when not given.
    policy: CodecPolicy | None = None
    # Bounds concurrent generations and their queue (settings.max_concurrent_requests, ...).
    admission: Admission | None = None
    # Stored packets (uploads, Publish streams) and the image-prefix KV cache (rx_service/streams.py).
    store: Any = None  # rx_service.store.FeatureStore
    kv_cache: Any = None  # rx_service.prefix_cache.PrefixKVCache
    # Folded first-layer decoders (pca, sparse) by codec fingerprint (settings.fold_decoder).
    _fold_cache: FoldCache | None = None

    @classmethod
    def load(cls, settings: RxSettings) -> RxEngine:
        folder = resolve_model(settings.model, settings.cache_dir)
        fingerprint = model_fingerprint(folder, settings.cache_dir)
        half = load_rx_half(folder, settings.split_point)
        engine = cls(
            settings=settings,
            half=half,
            model_id=settings.model,
            fingerprint=fingerprint,
            architecture=type(half).__name__,
            notice=model_notice(folder),
            artifacts=ArtifactIndex.discover(
                fingerprint,
                model=settings.model,
                model_folder=folder,
                cache_dir=settings.cache_dir,
                explicit=settings.codec_artifacts,
            ),
        )
        engine.codec_policy()  # a bad codec in the settings fails at start-up
        from rx_service.prefix_cache import PrefixKVCache
        from rx_service.store import open_store

        engine.store = open_store(settings)
        engine.kv_cache = PrefixKVCache(settings.kv_cache_bytes, engine.fingerprint)
        return engine

    def codec_policy(self) -> CodecPolicy:
        """The accepted codecs; every calibrated codec this Rx holds an artifact for is among them."""
        if self.policy is None:
            family = f"{self.architecture or type(self.half).__name__} ({self.model_id})"
            self.policy = CodecPolicy(
                self.settings.codecs,
                self.artifacts,
                supported=lambda codec: check_codec_support(codec, self.half.codec_support, family),
            )
        return self.policy

    def advertised_codecs(self) -> list[str]:
        specs = [c.spec for c in self.codecs.values()]
        return specs + (["any"] if self.codec_policy().allow_any else [])

    @property
    def codecs(self) -> dict[str, Codec]:
        """Accepted codecs by fingerprint (those configured, then any built on demand)."""
        return self.codec_policy().codecs

    def admission_control(self) -> Admission:
        if self.admission is None:
            s = self.settings
            self.admission = Admission(s.max_concurrent_requests, s.max_queued_requests, s.queue_timeout_s)
        return self.admission

    # ---- info -------------------------------------------------------------
    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            service="rx",
            version=__version__,
            format_versions=list(SUPPORTED_FORMAT_VERSIONS),
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            split_points=[split_point_to_pb(self.settings.split_point)],
            codecs=self.advertised_codecs(),
            codec_fingerprints=list(self.codecs),
            max_packet_bytes=self.settings.max_packet_bytes,
            architecture=self.architecture,
            notice=self.notice,
        )

    # ---- checks -----------------------------------------------------------
    def check_header(self, header: pb.FeatureHeader) -> Codec:
        """Validate a header against limits, model, split point and codec; return its codec."""
        validate_header(header, self.settings.packet_limits())
        if header.model_fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                "model fingerprint mismatch: the packet (Tx) was made with "
                f"{header.model_fingerprint or '<none>'}, this Rx holds {self.fingerprint} "
                f"({self.model_id}); load the same checkpoint on both sides"
            )
        split = split_point_from_pb(header.split_point)
        if split != self.settings.split_point:
            raise FingerprintMismatchError(
                f"split point mismatch: the packet was cut {split.value}, "
                f"this Rx expects {self.settings.split_point.value}"
            )
        if header.shape[1] != self.half.feature_dim:
            raise BadRequestError(
                f"packet features have dim {header.shape[1]}, this model's {split.value} features have "
                f"dim {self.half.feature_dim}"
            )
        codec = self.codec_policy().codec_for(header.codec_spec, header.codec_fingerprint)
        family = self.architecture or type(self.half).__name__
        check_codec_support(codec, self.half.codec_support, f"{family} ({self.model_id})")
        return codec

    def check_request(
        self,
        prompt: str,
        options: GenerationOptions,
        header: pb.FeatureHeader | None = None,
        codec: Codec | None = None,
    ) -> None:
        """Prompt and options; with the (checked) header and its codec, the token budget against
        the model (`rx_service.limits.check_token_budget`)."""
        if not prompt.strip():
            raise BadRequestError("prompt is empty")
        if len(prompt) > self.settings.max_prompt_chars:
            raise BadRequestError(
                f"prompt has {len(prompt)} characters; limit {self.settings.max_prompt_chars}"
            )
        options.validate(self.settings.max_new_tokens_limit)
        if header is not None and codec is not None:
            check_token_budget(self.half, codec, header, prompt, options)

    def options_from_pb(self, opts: pb.GenerationOptions | None) -> GenerationOptions:
        if opts is None:
            return GenerationOptions(max_new_tokens=self.settings.default_max_new_tokens)
        return GenerationOptions(
            max_new_tokens=opts.max_new_tokens or self.settings.default_max_new_tokens,
            temperature=float(opts.temperature),
            top_p=float(opts.top_p) or 1.0,
            top_k=int(opts.top_k),
            seed=int(opts.seed),
        )

    # ---- generation -------------------------------------------------------
    def generate(
        self,
        header: pb.FeatureHeader,
        payload: bytes,
        prompt: str,
        options: GenerationOptions,
        deadline: float | None = None,
        feature_id: str = "",
    ) -> Iterator[pb.TextChunk]:
        """Verify and decode the payload, then stream text chunks; the last one has `done`.

        `deadline` (time.monotonic()) is the client's; settings.request_timeout_s bounds it too.
        `feature_id` (stored features) keys the image-prefix KV cache and is echoed on the last chunk.
        """
        server_deadline = time.monotonic() + self.settings.request_timeout_s
        deadline = server_deadline if deadline is None else min(deadline, server_deadline)
        codec = self.check_header(header)
        self.check_request(prompt, options, header, codec)
        verify_payload(header, payload)
        t0 = time.perf_counter()
        features = self._folded_features(header, payload, codec)
        if features is not None:
            timings = {"rx_folded_decode": (time.perf_counter() - t0) * 1e3}
        else:
            features = features_from_payload(header, payload, codec)
            timings = {"rx_codec_decode": (time.perf_counter() - t0) * 1e3}
        n_prompt = prompt_tokens(self.half, prompt, features)
        for chunk in self._stream(prompt, features, options, header, timings, deadline, feature_id):
            if chunk.done:
                chunk.prompt_tokens = n_prompt
                chunk.feature_id = feature_id
            yield chunk

    def _folded_features(
        self, header: pb.FeatureHeader, payload: bytes, codec: Codec
    ) -> VisionFeatures | None:
        """Compressed-domain decoding (`shared.codecs.fold`): the projector's first Linear applied to
        the codec's compact coefficients, never materialising the features; None when not possible."""
        if not self.settings.fold_decoder or not self.half.codec_support.fold_linear:
            return None
        if self._fold_cache is None:
            leading = self.half.leading_linear()
            if leading is None:
                return None
            self._fold_cache = FoldCache(leading)
        folded = self._fold_cache.get(codec)
        if folded is None:
            return None
        shape = (int(header.shape[0]), int(header.shape[1]))
        code, _ = codec.decode_compact(payload, shape, header_dtype(header))
        with torch.inference_mode():
            h = folded(code)  # pca: dense matmul; sparse: k folded atoms gathered per token
        return VisionFeatures(features=h, meta=header_meta(header), pre_projected=True)

    def _stream(
        self,
        prompt: str,
        features: VisionFeatures,
        options: GenerationOptions,
        header: pb.FeatureHeader,
        timings: dict[str, float],
        deadline: float,
        feature_id: str = "",
    ) -> Iterator[pb.TextChunk]:
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        cancelled = threading.Event()
        token_times: list[float] = []
        admission = self.admission_control()
        queued = time.perf_counter()
        QUEUE_DEPTH.labels("rx").inc()
        try:
            admission.acquire(deadline)  # OverloadedError when the queue is full: before any stream starts
        finally:
            QUEUE_DEPTH.labels("rx").dec()
        timings["rx_queue"] = (time.perf_counter() - queued) * 1e3

        def on_token(token_id: int) -> None:
            if cancelled.is_set():
                raise _Cancelled()
            if time.monotonic() > deadline:
                raise RequestTimeoutError(
                    f"generation ran past the request deadline after {len(token_times) - 1} tokens"
                )
            token_times.append(time.perf_counter())
            events.put(("token", token_id))

        def run() -> None:
            start = time.perf_counter()
            try:
                token_times.append(start)
                if feature_id and self.kv_cache is not None and self.kv_cache.enabled:
                    self.kv_cache.generate(self.half, feature_id, prompt, features, options, on_token)
                else:
                    self.half.generate(prompt, features, options, on_token=on_token)
                events.put(("end", None))
            except _Cancelled:
                events.put(("end", None))
            except Exception as exc:
                events.put(("error", exc))
            finally:
                admission.release(time.perf_counter() - start)

        worker = threading.Thread(target=run, name="rx-generate", daemon=True)
        worker.start()
        detok = IncrementalDetokenizer(self.half.decode_tokens)
        try:
            while True:
                kind, value = events.get()
                if kind == "token":
                    assert isinstance(value, int)
                    text = detok.push(value)
                    yield pb.TextChunk(text=text, token_ids=[value], request_id=header.request_id)
                elif kind == "error":
                    assert isinstance(value, BaseException)
                    raise value
                else:
                    break
        finally:
            cancelled.set()
        worker.join()
        if len(token_times) > 1:
            timings["rx_prefill"] = (token_times[1] - token_times[0]) * 1e3
            timings["rx_decode"] = (token_times[-1] - token_times[1]) * 1e3
            if len(token_times) > 2:
                timings["rx_per_token"] = timings["rx_decode"] / (len(token_times) - 2)
        yield pb.TextChunk(
            text=detok.flush(),
            done=True,
            timings=pb.Timings(ms=timings),
            payload_bytes=header.payload_size,
            feature_bytes=raw_feature_bytes(header),
            request_id=header.request_id,
            codec_spec=header.codec_spec,
        )


class _Cancelled(Exception):
    """Raised inside generation when the client went away."""
