"""The Tx gRPC front end: TxService.Ask (image + prompt ─► streamed text) and Info."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from shared.codecs.rate import RateTarget
from shared.errors import BadRequestError, SplitVlmError, port_in_use
from shared.grpc_guard import GuardInterceptor
from shared.grpc_util import port_is_taken
from shared.health import add_health
from shared.logs import log_access, served_info
from shared.metrics import IN_FLIGHT, LATENCY, PAYLOAD_BYTES, REQUESTS, TOKENS, TTFT
from shared.protocol import pb, pb_grpc
from shared.security import TokenAuth, add_port, server_credentials, warn_if_exposed
from shared.split import GenerationOptions
from tx_service.engine import TxEngine

log = logging.getLogger("splitvlm.tx")


class TxServicer(pb_grpc.TxServiceServicer):
    def __init__(self, engine: TxEngine) -> None:
        self.engine = engine

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return served_info("tx", self.engine.info, request)

    def Ask(self, request: pb.AskRequest, context: grpc.ServicerContext) -> Iterator[pb.TextChunk]:
        started = time.perf_counter()
        status, request_id, payload_bytes, cache_hit = "OK", request.request_id, 0, False
        bytes_out = tokens = 0
        ttft: float | None = None
        IN_FLIGHT.labels("tx").inc()
        try:
            for name, value, limit in (
                ("codec", request.codec, 256),
                ("request_id", request.request_id, 128),
            ):
                if len(value) > limit:
                    raise BadRequestError(f"{name} has {len(value)} characters; at most {limit}")
            opts = request.options
            options = GenerationOptions(
                max_new_tokens=opts.max_new_tokens or 32,
                temperature=float(opts.temperature),
                top_p=float(opts.top_p) or 1.0,
                top_k=int(opts.top_k),
                seed=int(opts.seed),
            )
            # float32 on the wire: 0.99 arrives as 0.9900000095; round it back to what was meant.
            target = RateTarget(int(request.target_bytes), round(float(request.target_fidelity), 6))
            for chunk in self.engine.ask(
                request.image, request.prompt, options, request.codec, request.request_id, target
            ):
                if chunk.token_ids and ttft is None:
                    ttft = time.perf_counter() - started
                    TTFT.labels("tx").observe(ttft)
                tokens += len(chunk.token_ids)
                bytes_out += chunk.ByteSize()
                if chunk.done:
                    PAYLOAD_BYTES.labels("tx").observe(chunk.payload_bytes)
                    request_id, payload_bytes, cache_hit = (
                        chunk.request_id,
                        chunk.payload_bytes,
                        chunk.cache_hit,
                    )
                yield chunk
            REQUESTS.labels("tx", "Ask", "OK").inc()
        except SplitVlmError as exc:
            status = exc.grpc_code.name
            REQUESTS.labels("tx", "Ask", status).inc()
            log.info("rejected Ask: %s", exc)
            context.abort(exc.grpc_code, str(exc))
        except GeneratorExit:
            status = "CANCELLED"
            raise
        finally:
            IN_FLIGHT.labels("tx").dec()
            TOKENS.labels("tx").inc(tokens)
            elapsed = time.perf_counter() - started
            LATENCY.labels("tx", "Ask").observe(elapsed)
            log_access(
                "tx",
                "Ask",
                status,
                bytes_in=request.ByteSize(),
                bytes_out=bytes_out,
                ms=elapsed * 1e3,
                request_id=request_id,
                ttft_ms=None if ttft is None else ttft * 1e3,
                tokens=tokens,
                payload_bytes=payload_bytes,
                cache_hit=int(cache_hit),
            )


def create_grpc_server(engine: TxEngine, host: str, port: int, workers: int = 32) -> tuple[grpc.Server, int]:
    settings = engine.settings
    limit = settings.max_image_bytes + 64 * 1024
    auth = TokenAuth.from_settings(settings.auth_token, settings.auth_token_file)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tx-grpc"),
        interceptors=[GuardInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 8 * 2**20),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_TxServiceServicer_to_server(TxServicer(engine), server)
    add_health(server, "splitvlm.v1.TxService")
    if port_is_taken(host, port):
        raise port_in_use("Tx gRPC", host, port, "SPLITVLM_TX_PORT")
    address = f"{host}:{port}"
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(settings.tls_cert, settings.tls_key)
    bound = add_port(server, address, credentials, "Tx gRPC server")
    warn_if_exposed("Tx gRPC", host, tls=credentials is not None, auth=auth is not None)
    return server, bound
