"""Run the Tx gRPC server."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from shared.config import TxSettings
from shared.errors import RemoteError
from tx_service.engine import TxEngine
from tx_service.grpc_server import create_grpc_server
from tx_service.http_app import HttpServer, start_http

log = logging.getLogger("splitvlm.tx")


@dataclass
class RunningTx:
    engine: TxEngine
    grpc_server: grpc.Server
    port: int
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API, when settings.http_enabled

    @property
    def address(self) -> str:
        return f"{self.engine.settings.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.engine.settings.host}:{self.http.port}" if self.http else ""

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.grpc_server.stop(grace=1).wait()
        self.engine.rx.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def start_tx(settings: TxSettings, engine: TxEngine | None = None, require_rx: bool = False) -> RunningTx:
    """Load the vision half, pair with the Rx, and start serving in the background.

    A reachable Rx with another model is fatal (FingerprintMismatchError). An
    unreachable Rx is fatal only with `require_rx`; otherwise pairing is retried
    on the first request.
    """
    engine = engine or TxEngine.load(settings)
    try:
        engine.pair()
    except RemoteError as exc:
        if require_rx or exc.grpc_code != grpc.StatusCode.UNAVAILABLE:
            raise
        log.warning(
            "Rx at %s is not reachable yet (%s); will pair on the first request", settings.rx_address, exc
        )
    server, port = create_grpc_server(engine, settings.host, settings.port, settings.grpc_workers)
    server.start()
    log.info("Tx serving %s on %s:%d, Rx %s", engine.model_id, settings.host, port, settings.rx_address)
    running = RunningTx(engine=engine, grpc_server=server, port=port)
    if settings.http_enabled:
        running.http = start_http(engine, settings.host, settings.http_port)
    return running
