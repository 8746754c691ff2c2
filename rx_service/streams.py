"""Stored features on the Rx: upload, push mode (Publish) and questions about them (Query).

    POST /v1/features ─┐
    Publish frames ────┴─► store_packet: parse + the checks Generate makes ─► FeatureStore ─► id
    Query / chat completions with splitvlm://features/<id> | splitvlm://streams/<sid>/latest
        ─► resolve ─► StoredPacket ─► RxEngine.generate(..., feature_id) ─► TextChunks

A stored packet passes exactly the checks a Generate call makes (limits, version, model and
codec fingerprints, split point, checksum, and a trial decode), so every stored id answers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import grpc

from rx_service.engine import RxEngine
from rx_service.store import FeatureNotFoundError, FeatureStore, FrameRef, StoredPacket, check_stream_id
from rx_service.store.base import FEATURE_ID_RE
from shared.errors import BadRequestError, PacketError, PacketTooLargeError, SplitVlmError
from shared.metrics import LATENCY, REQUESTS
from shared.protocol import pb
from shared.protocol.packet import features_from_payload, packet_from_bytes, packet_to_bytes, verify_payload
from shared.split import GenerationOptions

log = logging.getLogger("splitvlm.rx")

_REF_RE = re.compile(r"^splitvlm://(?:features/(?P<fid>[^/]+)|streams/(?P<sid>[^/]+)/latest)$")
REF_HELP = "splitvlm://features/<id> or splitvlm://streams/<stream id>/latest"


def store_of(engine: RxEngine) -> FeatureStore:
    if engine.store is None:
        raise BadRequestError("this Rx has no feature store")
    return engine.store


def check_packet(engine: RxEngine, header: pb.FeatureHeader, payload: bytes) -> None:
    """The checks RxEngine.generate makes before it generates, including a trial decode."""
    codec = engine.check_header(header)
    verify_payload(header, payload)
    features_from_payload(header, payload, codec)


def store_packet(engine: RxEngine, data: bytes, frame: FrameRef | None = None) -> str:
    """Validate a serialized FeaturePacket and store it; returns its feature id."""
    header, payload = packet_from_bytes(data, engine.settings.packet_limits())
    check_packet(engine, header, payload)
    return store_of(engine).put(data, frame)


def resolve(engine: RxEngine, *, feature_id: str = "", stream_id: str = "") -> StoredPacket:
    """The stored packet a feature id or a stream's latest frame names; FeatureNotFoundError if none."""
    store = store_of(engine)
    if bool(feature_id) == bool(stream_id):
        raise BadRequestError("give exactly one of feature_id or stream_id")
    if feature_id:
        if not FEATURE_ID_RE.match(feature_id):
            raise FeatureNotFoundError(f"no stored features with id {feature_id[:80]!r}")
        entry = store.get(feature_id)
        if entry is None:
            raise FeatureNotFoundError(
                f"no stored features with id {feature_id} (never stored, expired or evicted)"
            )
        return entry
    check_stream_id(stream_id)
    entry = store.latest(stream_id)
    if entry is None:
        raise FeatureNotFoundError(f"no frames stored for stream {stream_id!r}")
    return entry


def resolve_url(engine: RxEngine, url: str, field: str) -> StoredPacket:
    match = _REF_RE.match(url)
    if match is None:
        shown = url if len(url) < 80 else url[:77] + "..."
        raise BadRequestError(
            f"invalid chat request: {field}: {shown!r} is not a stored-features reference; the Rx answers "
            f"about features stored on it ({REF_HELP}); send images to the Tx's API"
        )
    return resolve(engine, feature_id=match["fid"] or "", stream_id=match["sid"] or "")


def query(
    engine: RxEngine, stored: StoredPacket, prompt: str, options: GenerationOptions
) -> Iterator[pb.TextChunk]:
    header, payload = packet_from_bytes(stored.packet, engine.settings.packet_limits())
    return engine.generate(header, payload, prompt, options, feature_id=stored.feature_id)


def publish(engine: RxEngine, requests: Iterator[pb.PublishRequest]) -> Iterator[pb.PublishAck]:
    """Store each frame of a Publish stream and acknowledge it; a bad frame ends the stream (raises)."""
    store_of(engine)
    for request in requests:
        frame = request.frame
        check_stream_id(frame.stream_id)
        if not request.HasField("packet"):
            raise PacketError(f"frame {frame.sequence} of stream {frame.stream_id!r} carries no packet")
        data = packet_to_bytes(request.packet.header, request.packet.payload)
        if len(data) > engine.settings.max_packet_bytes + 64 * 1024:
            raise PacketTooLargeError(f"frame packet of {len(data)} bytes exceeds the limit")
        fid = store_packet(engine, data, FrameRef(frame.stream_id, frame.sequence, frame.capture_unix_ms))
        yield pb.PublishAck(sequence=frame.sequence, feature_id=fid)


# ---- gRPC handlers (RxService.Publish, RxService.Query) -------------------------------------


_publish_slots: dict[int, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _slots(engine: RxEngine) -> threading.BoundedSemaphore:
    """One semaphore per engine: a Publish stream holds a gRPC worker for its whole life."""
    with _slots_lock:
        return _publish_slots.setdefault(
            id(engine.settings), threading.BoundedSemaphore(engine.settings.max_publish_streams)
        )


def grpc_publish(
    engine: RxEngine, requests: Iterator[pb.PublishRequest], context: grpc.ServicerContext
) -> Iterator[pb.PublishAck]:
    started = time.perf_counter()
    frames = 0
    slots = _slots(engine)
    if not slots.acquire(blocking=False):
        REQUESTS.labels("rx", "Publish", "RESOURCE_EXHAUSTED").inc()
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this Rx already serves {engine.settings.max_publish_streams} Publish streams "
            "(SPLITVLM_RX_MAX_PUBLISH_STREAMS); retry later",
        )
    try:
        for ack in publish(engine, requests):
            frames += 1
            yield ack
        REQUESTS.labels("rx", "Publish", "OK").inc()
    except SplitVlmError as exc:
        REQUESTS.labels("rx", "Publish", exc.grpc_code.name).inc()
        log.info("ended Publish after %d frames: %s", frames, exc)
        context.abort(exc.grpc_code, str(exc))
    finally:
        slots.release()
        LATENCY.labels("rx", "Publish").observe(time.perf_counter() - started)


def grpc_query(
    engine: RxEngine, request: pb.QueryRequest, context: grpc.ServicerContext
) -> Iterator[pb.TextChunk]:
    started = time.perf_counter()
    try:
        stored = resolve(engine, feature_id=request.feature_id, stream_id=request.stream_id)
        options = engine.options_from_pb(request.options if request.HasField("options") else None)
        engine.check_request(request.prompt, options)
        yield from query(engine, stored, request.prompt, options)
        REQUESTS.labels("rx", "Query", "OK").inc()
    except SplitVlmError as exc:
        REQUESTS.labels("rx", "Query", exc.grpc_code.name).inc()
        log.info("rejected Query: %s", exc)
        context.abort(exc.grpc_code, str(exc))
    finally:
        LATENCY.labels("rx", "Query").observe(time.perf_counter() - started)
