"""Run the Tx gRPC server."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import grpc

from shared.config import TxSettings
from shared.errors import RemoteError, port_in_use
from shared.grpc_util import port_is_taken
from shared.metrics import MetricsServer, serve_metrics
from tx_service.engine import TxEngine
from tx_service.grpc_server import create_grpc_server
from tx_service.http_app import HttpServer, start_http

log = logging.getLogger("splitvlm.tx")


@dataclass
class RunningTx:
    engine: TxEngine
    grpc_server: grpc.Server
    port: int
    metrics: MetricsServer | None = None
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API, when settings.http_enabled

    @property
    def address(self) -> str:
        return f"{self.engine.settings.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.engine.settings.host}:{self.metrics.port}/metrics" if self.metrics else ""

    @property
    def http_url(self) -> str:
        return f"http://{self.engine.settings.host}:{self.http.port}" if self.http else ""

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.grpc_server.stop(grace=1).wait()
        if self.metrics is not None:
            self.metrics.stop()
        self.engine.rx.close()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def start_tx(
    settings: TxSettings, engine: TxEngine | None = None, require_rx: bool = False, metrics: bool = True
) -> RunningTx:
    """Load the vision half, pair with the Rx, and start serving in the background.

    With `metrics`, Prometheus metrics are served at http://HOST:METRICS_PORT/metrics.

    A reachable Rx with another model is fatal (FingerprintMismatchError). An
    unreachable Rx is fatal only with `require_rx`; otherwise pairing is retried
    on the first request.
    """
    # Taken ports fail before the model loads (which can take minutes), not after.
    if port_is_taken(settings.host, settings.port):
        raise port_in_use("Tx gRPC", settings.host, settings.port, "SPLITVLM_TX_PORT")
    if metrics and port_is_taken(settings.host, settings.metrics_port):
        raise port_in_use("Tx metrics", settings.host, settings.metrics_port, "SPLITVLM_TX_METRICS_PORT")
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
    metrics_server = None
    if metrics:
        try:
            metrics_server = serve_metrics(settings.host, settings.metrics_port)
        except OSError as exc:
            server.stop(grace=None)
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(
                    "Tx metrics", settings.host, settings.metrics_port, "SPLITVLM_TX_METRICS_PORT"
                ) from None
            raise
    server.start()
    log.info("Tx serving %s on %s:%d, Rx %s", engine.model_id, settings.host, port, settings.rx_address)
    running = RunningTx(engine=engine, grpc_server=server, port=port, metrics=metrics_server)
    if settings.http_enabled:
        running.http = start_http(engine, settings.host, settings.http_port)
    return running
