"""The Rx gRPC front end: RxService.Generate (client-streamed packet) and Info."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from rx_service import streams
from rx_service.engine import RxEngine
from shared.errors import PacketError, SplitVlmError
from shared.metrics import LATENCY, PAYLOAD_BYTES, REQUESTS
from shared.protocol import pb, pb_grpc

log = logging.getLogger("splitvlm.rx")

# Payload arrives in chunks; each gRPC message stays small whatever the packet size.
MAX_MESSAGE_BYTES = 8 * 2**20


class RxServicer(pb_grpc.RxServiceServicer):
    def __init__(self, engine: RxEngine) -> None:
        self.engine = engine

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        REQUESTS.labels("rx", "Info", "OK").inc()
        return self.engine.info()

    def Generate(
        self, request_iterator: Iterator[pb.GenerateRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TextChunk]:
        started = time.perf_counter()
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "start":
                raise PacketError(
                    "the first GenerateRequest message must carry `start` (header, prompt, options)"
                )
            start = first.start
            header = start.header
            # Check the header (sizes, fingerprints, codec) before accepting any payload bytes.
            self.engine.check_header(header)
            options = self.engine.options_from_pb(start.options if start.HasField("options") else None)
            self.engine.check_request(start.prompt, options)
            payload = _collect_payload(request_iterator, header.payload_size)
            PAYLOAD_BYTES.labels("rx").observe(len(payload))
            yield from self.engine.generate(header, payload, start.prompt, options)
            REQUESTS.labels("rx", "Generate", "OK").inc()
        except SplitVlmError as exc:
            REQUESTS.labels("rx", "Generate", exc.grpc_code.name).inc()
            log.info("rejected Generate: %s", exc)
            context.abort(exc.grpc_code, str(exc))
        finally:
            LATENCY.labels("rx", "Generate").observe(time.perf_counter() - started)

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
        ],
    )
    pb_grpc.add_RxServiceServicer_to_server(RxServicer(engine), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the Rx gRPC server to {host}:{port}")
    return server, bound
