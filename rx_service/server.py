"""Run the Rx: gRPC and HTTP front ends over one engine."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from dataclasses import dataclass

import grpc
import uvicorn

from rx_service.engine import RxEngine
from rx_service.grpc_server import create_grpc_server
from rx_service.http_app import create_app, wrap_app
from rx_service.http_guard import timed_h11
from shared.config import RxSettings
from shared.errors import port_in_use
from shared.grpc_util import port_is_taken
from shared.security import warn_if_exposed

log = logging.getLogger("splitvlm.rx")


@dataclass
class RunningRx:
    engine: RxEngine
    grpc_server: grpc.Server
    grpc_port: int
    http_server: uvicorn.Server | None
    http_port: int
    _http_thread: threading.Thread | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self.engine.settings.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.engine.settings.tls_cert is not None else "http"
        return f"{scheme}://{self.engine.settings.host}:{self.http_port}"

    def stop(self) -> None:
        if self.http_server is not None:
            self.http_server.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=10)
        self.grpc_server.stop(grace=1).wait()

    def wait(self) -> None:
        self.grpc_server.wait_for_termination()


def start_rx(settings: RxSettings, engine: RxEngine | None = None, http: bool = True) -> RunningRx:
    """Load the model (unless given an engine) and start both servers in the background."""
    # Taken ports fail before the model loads (which can take minutes), not after.
    if port_is_taken(settings.host, settings.grpc_port):
        raise port_in_use("Rx gRPC", settings.host, settings.grpc_port, "SPLITVLM_RX_GRPC_PORT")
    if http and port_is_taken(settings.host, settings.http_port):
        raise port_in_use("Rx HTTP", settings.host, settings.http_port, "SPLITVLM_RX_HTTP_PORT")
    engine = engine or RxEngine.load(settings)
    server, grpc_port = create_grpc_server(engine, settings.host, settings.grpc_port, settings.grpc_workers)
    server.start()
    running = RunningRx(engine=engine, grpc_server=server, grpc_port=grpc_port, http_server=None, http_port=0)
    if http:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host, settings.http_port))
        except OSError as exc:
            sock.close()
            server.stop(grace=None)
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(
                    "Rx HTTP", settings.host, settings.http_port, "SPLITVLM_RX_HTTP_PORT"
                ) from None
            raise
        app = wrap_app(create_app(engine), settings.max_packet_bytes + 256 * 1024, engine)
        tls = settings.tls_cert is not None and settings.tls_key is not None
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            # Our own access log (`rx_service.http_access`) replaces uvicorn's.
            access_log=False,
            log_config=None,
            http=timed_h11(settings.http_header_timeout_s),
            timeout_keep_alive=max(1, round(settings.http_keepalive_s)),
            ssl_certfile=str(settings.tls_cert) if tls else None,
            ssl_keyfile=str(settings.tls_key) if tls else None,
        )
        warn_if_exposed(
            "Rx HTTP", settings.host, tls=tls, auth=bool(settings.auth_token or settings.auth_token_file)
        )
        http_server = uvicorn.Server(config)
        thread = threading.Thread(
            target=http_server.run, kwargs={"sockets": [sock]}, daemon=True, name="rx-http"
        )
        thread.start()
        running.http_server = http_server
        running.http_port = sock.getsockname()[1]
        running._http_thread = thread
        for _ in range(500):
            if http_server.started:
                break
            threading.Event().wait(0.01)
    log.info("Rx serving %s: gRPC %s, HTTP %s", engine.model_id, running.grpc_address, running.http_url)
    return running
