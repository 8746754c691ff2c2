"""The Rx gRPC front end: RxService.Generate (client-streamed packet) and Info."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from rx_service import streams
from rx_service.engine import RxEngine
from shared.errors import PacketError, SplitVlmError, port_in_use
from shared.grpc_util import port_is_taken
from shared.logs import log_access
from shared.metrics import IN_FLIGHT, LATENCY, PAYLOAD_BYTES, REQUESTS, TOKENS, TTFT
from shared.protocol import pb, pb_grpc

log = logging.getLogger("splitvlm.rx")

# Payload arrives in chunks; each gRPC message stays small whatever the packet size.
MAX_MESSAGE_BYTES = 8 * 2**20


class RxServicer(pb_grpc.RxServiceServicer):
    def __init__(self, engine: RxEngine) -> None:
        self.engine = engine

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        started = time.perf_counter()
        REQUESTS.labels("rx", "Info", "OK").inc()
        info = self.engine.info()
        log_access(
            "rx",
            "Info",
            "OK",
            bytes_in=request.ByteSize(),
            bytes_out=info.ByteSize(),
            ms=(time.perf_counter() - started) * 1e3,
        )
        return info

    def Generate(
        self, request_iterator: Iterator[pb.GenerateRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TextChunk]:
        started = time.perf_counter()
        status, request_id = "OK", ""
        bytes_in = bytes_out = tokens = 0
        ttft: float | None = None
        IN_FLIGHT.labels("rx").inc()
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "start":
                raise PacketError(
                    "the first GenerateRequest message must carry `start` (header, prompt, options)"
                )
            bytes_in = first.ByteSize()
            start = first.start
            header = start.header
            request_id = header.request_id
            # Check the header (sizes, fingerprints, codec) before accepting any payload bytes.
            self.engine.check_header(header)
            options = self.engine.options_from_pb(start.options if start.HasField("options") else None)
            self.engine.check_request(start.prompt, options)
            payload = _collect_payload(request_iterator, header.payload_size)
            bytes_in += len(payload)
            PAYLOAD_BYTES.labels("rx").observe(len(payload))
            for chunk in self.engine.generate(header, payload, start.prompt, options):
                if chunk.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                    TTFT.labels("rx").observe(ttft)
                tokens += len(chunk.token_ids)
                bytes_out += chunk.ByteSize()
                yield chunk
            REQUESTS.labels("rx", "Generate", "OK").inc()
        except SplitVlmError as exc:
            status = exc.grpc_code.name
            REQUESTS.labels("rx", "Generate", status).inc()
            log.info("rejected Generate: %s", exc)
            context.abort(exc.grpc_code, str(exc))
        except GeneratorExit:
            status = "CANCELLED"
            raise
        finally:
            IN_FLIGHT.labels("rx").dec()
            TOKENS.labels("rx").inc(tokens)
            elapsed = time.perf_counter() - started
            LATENCY.labels("rx", "Generate").observe(elapsed)
            log_access(
                "rx",
                "Generate",
                status,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                ms=elapsed * 1e3,
                request_id=request_id,
                ttft_ms=None if ttft is None else ttft * 1e3,
                tokens=tokens,
            )

    # ---- push mode and stored features (rx_service/streams.py) ----
    def Publish(
        self, request_iterator: Iterator[pb.PublishRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PublishAck]:
        yield from streams.grpc_publish(self.engine, request_iterator, context)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> Iterator[pb.TextChunk]:
        yield from streams.grpc_query(self.engine, request, context)


def _collect_payload(request_iterator: Iterator[pb.GenerateRequest], declared: int) -> bytes:
    buf = bytearray()
    for msg in request_iterator:
        if msg.WhichOneof("part") != "payload_chunk":
            raise PacketError("after `start`, every GenerateRequest message must carry `payload_chunk`")
        if len(buf) + len(msg.payload_chunk) > declared:
            raise PacketError(f"received more payload than the {declared} bytes the header declares")
        buf.extend(msg.payload_chunk)
    return bytes(buf)


def create_grpc_server(engine: RxEngine, host: str, port: int, workers: int = 4) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound (useful with port 0)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rx-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Without this a second server silently shares a port that is already taken.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_RxServiceServicer_to_server(RxServicer(engine), server)
    if port_is_taken(host, port):
        raise port_in_use("Rx gRPC", host, port, "SPLITVLM_RX_GRPC_PORT")
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio >= 1.6x raises instead of returning 0
        bound = 0
    if bound == 0:
        raise port_in_use("Rx gRPC", host, port, "SPLITVLM_RX_GRPC_PORT")
    return server, bound
