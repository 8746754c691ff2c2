"""The Rx gRPC front end: RxService.Generate (client-streamed packet) and Info."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from rx_service import streams
from rx_service.engine import RxEngine
from rx_service.stream_reader import StreamReader
from shared.errors import PacketError, SplitVlmError, port_in_use
from shared.grpc_guard import GuardInterceptor
from shared.grpc_util import port_is_taken
from shared.health import add_health
from shared.logs import log_access, served_info
from shared.metrics import IN_FLIGHT, LATENCY, PAYLOAD_BYTES, REQUESTS, TOKENS, TTFT
from shared.protocol import pb, pb_grpc
from shared.security import TokenAuth, add_port, server_credentials, warn_if_exposed

log = logging.getLogger("splitvlm.rx")

# Payload arrives in chunks; each gRPC message stays small whatever the packet size.
MAX_MESSAGE_BYTES = 8 * 2**20


class RxServicer(pb_grpc.RxServiceServicer):
    def __init__(self, engine: RxEngine) -> None:
        self.engine = engine

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return served_info("rx", self.engine.info, request)

    def Generate(
        self, request_iterator: Iterator[pb.GenerateRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TextChunk]:
        started = time.perf_counter()
        settings = self.engine.settings
        messages = StreamReader(
            request_iterator,
            idle_timeout_s=settings.stream_idle_timeout_s,
            total_timeout_s=settings.upload_timeout_s,
        )
        status, request_id = "OK", ""
        bytes_in = bytes_out = tokens = 0
        ttft: float | None = None
        IN_FLIGHT.labels("rx").inc()
        try:
            first = messages.next()
            if first is None or first.WhichOneof("part") != "start":
                raise PacketError(
                    "the first GenerateRequest message must carry `start` (header, prompt, options)"
                )
            bytes_in = first.ByteSize()
            start = first.start
            header = start.header
            request_id = header.request_id
            # Check the header (sizes, fingerprints, codec) before accepting any payload bytes.
            codec = self.engine.check_header(header)
            options = self.engine.options_from_pb(start.options if start.HasField("options") else None)
            self.engine.check_request(start.prompt, options, header, codec)
            payload = messages.payload(header.payload_size)
            bytes_in += len(payload)
            PAYLOAD_BYTES.labels("rx").observe(len(payload))
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            for chunk in self.engine.generate(header, payload, start.prompt, options, deadline):
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


def create_grpc_server(engine: RxEngine, host: str, port: int, workers: int = 32) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound (useful with port 0).

    TLS (and mTLS) and bearer tokens come from the engine's settings; see `shared.security`.
    """
    settings = engine.settings
    auth = TokenAuth.from_settings(settings.auth_token, settings.auth_token_file)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rx-grpc"),
        interceptors=[GuardInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        # Calls past the thread count are refused (RESOURCE_EXHAUSTED) rather than queued unseen.
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_RxServiceServicer_to_server(RxServicer(engine), server)
    add_health(server, "splitvlm.v1.RxService")
    if port_is_taken(host, port):
        raise port_in_use("Rx gRPC", host, port, "SPLITVLM_RX_GRPC_PORT")
    address = f"{host}:{port}"
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    bound = add_port(server, address, credentials, "Rx gRPC server")
    warn_if_exposed("Rx gRPC", host, tls=credentials is not None, auth=auth is not None)
    return server, bound
