"""The Tx engine: image ─► processor ─► vision encoder ─► codec ─► packet ─► Rx.

Pairs with its Rx before the first request: both must hold the same model
fingerprint and split point, or the Tx refuses to send anything.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from PIL import Image

from rx_service.client import RxClient
from shared import __version__
from shared.codecs import Codec
from shared.codecs.artifacts import ArtifactIndex
from shared.codecs.calibrate import build_codec_with
from shared.codecs.rate import RateController, RateTarget, usable_ladder
from shared.config import TxSettings
from shared.errors import BadRequestError, FingerprintMismatchError
from shared.images import decode_image
from shared.metrics import queued
from shared.models.card import model_notice
from shared.models.registry import model_fingerprint, resolve_model
from shared.protocol import pb
from shared.protocol.packet import (
    SUPPORTED_FORMAT_VERSIONS,
    build_header,
    split_point_from_pb,
    split_point_to_pb,
)
from shared.security import channel_credentials, read_token
from shared.split import GenerationOptions, TxHalf, check_codec_support, features_for_codec, load_tx_half
from tx_service.cache import PacketCache, cache_key
from tx_service.retry import call_with_retry, stream_with_retry

log = logging.getLogger("splitvlm.tx")

_MAX_CODECS = 32


def rx_client(settings: TxSettings) -> RxClient:
    """The Tx's client for its Rx: TLS when tls_ca is set (mTLS with tls_cert/tls_key), and the
    Rx's bearer token."""
    credentials = None
    if settings.tls_ca is not None:
        credentials = channel_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
    return RxClient(
        settings.rx_address,
        timeout_s=settings.rx_timeout_s,
        chunk_bytes=settings.chunk_bytes,
        credentials=credentials,
        token=read_token(settings.rx_auth_token, settings.rx_auth_token_file),
    )


@dataclass
class EncodedImage:
    header: pb.FeatureHeader
    payload: bytes
    timings_ms: dict[str, float]
    rate_control: str = ""  # rate control's note when it chose the codec
    # The vision output's size before the codec, token reduction included (for ratios).
    source_bytes: int = 0


@dataclass
class TxEngine:
    settings: TxSettings
    half: TxHalf
    model_id: str
    fingerprint: str
    rx: RxClient
    notice: str = ""
    codecs: dict[str, Codec] = field(default_factory=dict)  # by requested name/spec
    # Calibration artifacts for this model by canonical codec spec: settings.codec_artifacts, then
    # the cache dir's and the checkpoint's codecs/ folders (shared/codecs/artifacts.py).
    artifacts: ArtifactIndex = field(default_factory=lambda: ArtifactIndex(""))
    cache: PacketCache = field(default_factory=lambda: PacketCache(0))
    rate: RateController | None = None  # built on the first rate-controlled request
    _paired_with: str = ""
    _encode_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, settings: TxSettings, rx: RxClient | None = None) -> TxEngine:
        folder = resolve_model(settings.model, settings.cache_dir, tx_split=settings.split_point)
        fingerprint = model_fingerprint(folder, settings.cache_dir)
        engine = cls(
            settings=settings,
            half=load_tx_half(folder, settings.split_point),
            model_id=settings.model,
            fingerprint=fingerprint,
            rx=rx or rx_client(settings),
            notice=model_notice(folder),
            cache=PacketCache(settings.cache_bytes),
            artifacts=ArtifactIndex.discover(
                fingerprint,
                model=settings.model,
                model_folder=folder,
                cache_dir=settings.cache_dir,
                explicit=settings.codec_artifacts,
            ),
        )
        engine.codec(settings.codec)  # fail at start-up on a bad default codec
        return engine

    def codec(self, name: str) -> Codec:
        name = name or self.settings.codec
        codec = self.codecs.get(name)
        if codec is None:
            codec = build_codec_with(name, self.artifacts)
            # Refuse what this split cannot take (e.g. token reduction) before any inference.
            check_codec_support(
                codec,
                self.half.codec_support,
                f"{type(self.half).__name__} ({self.model_id})",
                token_scores=self.half.token_scores,
            )
            if len(self.codecs) < _MAX_CODECS:
                self.codecs[name] = codec
        return codec

    def rate_controller(self) -> RateController:
        """The model's measured ladder when one was found (most accurate codec that fits first),
        else the default ladder; less the codecs this split refuses (e.g. token reducers)."""
        if self.rate is None:
            family = f"{type(self.half).__name__} ({self.model_id})"

            def accept(codec: Codec) -> None:
                check_codec_support(
                    codec, self.half.codec_support, family, token_scores=self.half.token_scores
                )

            measured = self.artifacts.ladder()
            if measured is not None:
                self.rate = RateController(measured=measured, artifacts=self.artifacts, accept=accept)
            else:
                self.rate = RateController(usable_ladder(accept=accept))
        return self.rate

    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            service="tx",
            version=__version__,
            format_versions=list(SUPPORTED_FORMAT_VERSIONS),
            model_id=self.model_id,
            model_fingerprint=self.fingerprint,
            split_points=[split_point_to_pb(self.settings.split_point)],
            codecs=[c.spec for c in self.codecs.values()],
            codec_fingerprints=[c.fingerprint for c in self.codecs.values()],
            architecture=type(self.half).__name__,
            notice=self.notice,
        )

    def pair(self) -> pb.InfoResponse:
        """Ask the Rx who it is; refuse to work with an Rx holding another model or split."""
        info = self.rx.info(timeout_s=30)
        if info.model_fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"refusing to pair: this Tx holds model {self.model_id} ({self.fingerprint}), "
                f"the Rx at {self.rx.address} holds {info.model_id} ({info.model_fingerprint})"
            )
        rx_splits = [split_point_from_pb(s) for s in info.split_points]
        if self.settings.split_point not in rx_splits:
            raise FingerprintMismatchError(
                f"refusing to pair: this Tx cuts {self.settings.split_point.value}, the Rx at "
                f"{self.rx.address} expects {[s.value for s in rx_splits]}"
            )
        self._paired_with = info.model_fingerprint
        return info

    def encode(
        self,
        image: Image.Image,
        codec_name: str = "",
        request_id: str = "",
        target: RateTarget | None = None,
    ) -> EncodedImage:
        """One image to a packet; with an active `target`, rate control picks the codec."""
        if target is not None and target.active:
            return self._encode_rate_controlled(image, target, request_id)
        codec = self.codec(codec_name)
        timings: dict[str, float] = {}
        with queued("tx", self._encode_lock), torch.inference_mode():
            t0 = time.perf_counter()
            inputs = self.half.preprocess([image])
            t1 = time.perf_counter()
            if codec.score_kind:  # e.g. prune:score=cls ranks tokens by the tower's CLS attention
                features = self.half.encode_scored(inputs, codec.score_kind)
            else:
                features = self.half.encode(inputs)
            t2 = time.perf_counter()
            source_bytes = features.features.numel() * features.features.element_size()
            decoded, features = features_for_codec(codec, features)
            payload = codec.encode(features.features, scores=features.scores)
            t3 = time.perf_counter()
        header = build_header(
            request_id=request_id or uuid.uuid4().hex,
            model_fingerprint=self.fingerprint,
            split_point=self.settings.split_point,
            codec_spec=codec.spec,
            codec_fingerprint=codec.fingerprint,
            features=features,
            payload=payload,
            shape=decoded,
        )
        t4 = time.perf_counter()
        timings.update(
            tx_preprocess=(t1 - t0) * 1e3,
            tx_vision_encoder=(t2 - t1) * 1e3,
            tx_codec_encode=(t3 - t2) * 1e3,
            tx_serialize=(t4 - t3) * 1e3,
        )
        return EncodedImage(header=header, payload=payload, timings_ms=timings, source_bytes=source_bytes)

    def _encode_rate_controlled(
        self, image: Image.Image, target: RateTarget, request_id: str
    ) -> EncodedImage:
        rate = self.rate_controller()
        with queued("tx", self._encode_lock), torch.inference_mode():
            t0 = time.perf_counter()
            inputs = self.half.preprocess([image])
            t1 = time.perf_counter()
            features = self.half.encode(inputs)
            t2 = time.perf_counter()
            source_bytes = features.features.numel() * features.features.element_size()
            choice = rate.choose(features.features, target)
            decoded, features = features_for_codec(choice.codec, features)
            t3 = time.perf_counter()
        header = build_header(
            request_id=request_id or uuid.uuid4().hex,
            model_fingerprint=self.fingerprint,
            split_point=self.settings.split_point,
            codec_spec=choice.codec.spec,
            codec_fingerprint=choice.codec.fingerprint,
            features=features,
            payload=choice.payload,
            shape=decoded,
        )
        t4 = time.perf_counter()
        log.debug("rate control %s", choice.note())
        timings = {
            "tx_preprocess": (t1 - t0) * 1e3,
            "tx_vision_encoder": (t2 - t1) * 1e3,
            "tx_rate_control": (t3 - t2) * 1e3,  # every candidate encoded (and decoded) on the way
            "tx_serialize": (t4 - t3) * 1e3,
        }
        return EncodedImage(
            header=header,
            payload=choice.payload,
            timings_ms=timings,
            rate_control=choice.note(),
            source_bytes=source_bytes,
        )

    def ask(
        self,
        image_bytes: bytes,
        prompt: str,
        options: GenerationOptions,
        codec_name: str = "",
        request_id: str = "",
        target: RateTarget | None = None,
    ) -> Iterator[pb.TextChunk]:
        """Encode one image and stream the Rx's answer back, with Tx timings added at the end.

        With an active `target` (not together with `codec_name`), rate control picks the codec.
        """
        started = time.perf_counter()
        if not prompt.strip():
            raise BadRequestError("prompt is empty")
        if len(prompt) > self.settings.max_prompt_chars:
            raise BadRequestError(
                f"prompt has {len(prompt)} characters; limit {self.settings.max_prompt_chars}"
            )
        options.validate()
        rate_controlled = target is not None and target.active
        if rate_controlled and codec_name:
            raise BadRequestError(
                f"give either a codec ({codec_name!r}) or a rate-control target "
                f"({target.describe() if target else ''}), not both"
            )
        if rate_controlled:
            # The choice depends on the target and the ladder, so both are part of the key.
            rate = self.rate_controller()
            assert target is not None
            codec_key = "rate:" + target.describe() + "|" + ";".join(rate.specs)
        else:
            codec_key = self.codec(codec_name).fingerprint  # a bad codec name fails before any compute
        if self._paired_with != self.fingerprint:
            call_with_retry(self.pair, self.settings.rx_retry_budget_s)
        key = cache_key(image_bytes, self.fingerprint, codec_key)
        cached = self.cache.get(key)
        if cached is not None:
            header = pb.FeatureHeader()
            header.CopyFrom(cached.header)
            header.request_id = request_id or uuid.uuid4().hex
            note = ""
            if rate_controlled and target is not None:
                note = f"{target.describe()}: chose {header.codec_spec!r} ({len(cached.payload)} B; cached)"
            encoded = EncodedImage(
                header=header,
                payload=cached.payload,
                timings_ms={},
                rate_control=note,
                source_bytes=cached.source_bytes,
            )
        else:
            image = decode_image(image_bytes, self.settings.max_image_bytes, self.settings.max_image_pixels)
            encoded = self.encode(image, codec_name, request_id, target)
            self.cache.put(key, encoded.header, encoded.payload, encoded.source_bytes)
        requests = self.rx.build_requests(encoded.header, encoded.payload, prompt, options)
        wire_bytes = sum(r.ByteSize() for r in requests)
        budget = self.settings.rx_retry_budget_s
        for chunk in stream_with_retry(lambda: self.rx.stream_requests(requests), budget):
            if chunk.done:
                chunk.timings.ms.update(encoded.timings_ms)
                chunk.timings.ms["tx_total"] = (time.perf_counter() - started) * 1e3
                chunk.wire_bytes = wire_bytes
                chunk.cache_hit = cached is not None
                chunk.rate_control = encoded.rate_control
                if encoded.source_bytes:  # the Rx only knows the decoded (maybe token-reduced) size
                    chunk.feature_bytes = encoded.source_bytes
            yield chunk
