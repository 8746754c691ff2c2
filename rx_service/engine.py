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

from rx_service.context import check_context, prompt_tokens
from shared import __version__
from shared.codecs import Codec, build_codec
from shared.codecs.calibrate import build_codec_with, load_artifacts
from shared.codecs.calibration import CalibrationArtifact
from shared.codecs.fold import FoldCache
from shared.config import RxSettings
from shared.errors import BadRequestError, CodecError, FingerprintMismatchError
from shared.metrics import queued
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

_MAX_EXTRA_CODECS = 32  # codecs built on demand from a packet's spec, kept for reuse


@dataclass
class RxEngine:
    settings: RxSettings
    half: RxHalf
    model_id: str
    fingerprint: str
    architecture: str = ""
    notice: str = ""
    codecs: dict[str, Codec] = field(default_factory=dict)  # by codec fingerprint
    # Calibration artifacts by the canonical codec spec they were fitted for (settings.codec_artifacts).
    artifacts: dict[str, CalibrationArtifact] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Folded first-layer decoders (pca, sparse) by codec fingerprint (settings.fold_decoder).
    _fold_cache: FoldCache | None = None
    # Stored packets (uploads, Publish streams) and the image-prefix KV cache (rx_service/streams.py).
    store: Any = None  # rx_service.store.FeatureStore
    kv_cache: Any = None  # rx_service.prefix_cache.PrefixKVCache

    @classmethod
    def load(cls, settings: RxSettings) -> RxEngine:
        folder = resolve_model(settings.model, settings.cache_dir)
        half = load_rx_half(folder, settings.split_point)
        engine = cls(
            settings=settings,
            half=half,
            model_id=settings.model,
            fingerprint=model_fingerprint(folder, settings.cache_dir),
            architecture=type(half).__name__,
            notice=model_notice(folder),
            artifacts=load_artifacts(settings.codec_artifacts, model_fingerprint(folder, settings.cache_dir)),
        )
        for spec in settings.codecs:
            codec = build_codec_with(spec, engine.artifacts)
            engine.codecs[codec.fingerprint] = codec
        # Every calibrated codec this Rx holds an artifact for is accepted (and advertised in Info).
        for spec, artifact in engine.artifacts.items():
            codec = build_codec(spec, artifact=artifact)
            engine.codecs[codec.fingerprint] = codec
        from rx_service.prefix_cache import PrefixKVCache
        from rx_service.store import open_store

        engine.store = open_store(settings)
        engine.kv_cache = PrefixKVCache(settings.kv_cache_bytes, engine.fingerprint)
        return engine

    # ---- info -------------------------------------------------------------
    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            service="rx",
            version=__version__,
            format_versions=list(SUPPORTED_FORMAT_VERSIONS),
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            split_points=[split_point_to_pb(self.settings.split_point)],
            codecs=[c.spec for c in self.codecs.values()],
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
        codec = self._codec_for(header)
        family = self.architecture or type(self.half).__name__
        check_codec_support(codec, self.half.codec_support, f"{family} ({self.model_id})")
        return codec

    def _codec_for(self, header: pb.FeatureHeader) -> Codec:
        codec = self.codecs.get(header.codec_fingerprint)
        if codec is not None:
            return codec
        try:
            codec = build_codec_with(header.codec_spec, self.artifacts)
        except CodecError as exc:
            raise CodecError(f"packet codec spec {header.codec_spec!r} is not usable here: {exc}") from None
        if codec.fingerprint != header.codec_fingerprint:
            raise FingerprintMismatchError(
                f"codec fingerprint mismatch for {header.codec_spec!r}: the packet has "
                f"{header.codec_fingerprint or '<none>'}, this Rx computes {codec.fingerprint} "
                "(calibrated codecs need the same artifact on both sides)"
            )
        if len(self.codecs) < len(self.settings.codecs) + len(self.artifacts) + _MAX_EXTRA_CODECS:
            self.codecs[codec.fingerprint] = codec
        return codec

    def check_request(self, prompt: str, options: GenerationOptions) -> None:
        if not prompt.strip():
            raise BadRequestError("prompt is empty")
        if len(prompt) > self.settings.max_prompt_chars:
            raise BadRequestError(
                f"prompt has {len(prompt)} characters; limit {self.settings.max_prompt_chars}"
            )
        options.validate(self.settings.max_new_tokens_limit)

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
        feature_id: str = "",
    ) -> Iterator[pb.TextChunk]:
        """Verify and decode the payload, then stream text chunks; the last one has `done`.

        `feature_id` (stored features) keys the image-prefix KV cache and is echoed on the last chunk.
        """
        codec = self.check_header(header)
        self.check_request(prompt, options)
        verify_payload(header, payload)
        t0 = time.perf_counter()
        features = self._folded_features(header, payload, codec)
        if features is not None:
            timings = {"rx_folded_decode": (time.perf_counter() - t0) * 1e3}
        else:
            features = features_from_payload(header, payload, codec)
            timings = {"rx_codec_decode": (time.perf_counter() - t0) * 1e3}
        n_prompt = prompt_tokens(self.half, prompt, features)
        check_context(self.half, n_prompt, options)
        for chunk in self._stream(prompt, features, options, header, timings, feature_id):
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
        feature_id: str = "",
    ) -> Iterator[pb.TextChunk]:
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        cancelled = threading.Event()
        token_times: list[float] = []

        def on_token(token_id: int) -> None:
            if cancelled.is_set():
                raise _Cancelled()
            token_times.append(time.perf_counter())
            events.put(("token", token_id))

        def run() -> None:
            try:
                with queued("rx", self._lock):
                    start = time.perf_counter()
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
