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
from shared.config import RxSettings
from shared.errors import port_in_use
from shared.grpc_util import port_is_taken

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
        return f"http://{self.engine.settings.host}:{self.http_port}"

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
        app = wrap_app(create_app(engine), settings.max_packet_bytes + 256 * 1024)
        # Our own access log (`rx_service.http_access`) replaces uvicorn's.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", log_config=None)
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
