"""The Tx HTTP server: the OpenAI-compatible app (tx_service/openai_api.py) on its own port.

Off by default (`SPLITVLM_TX_HTTP_ENABLED=1`): an edge box
exposes only what its operator turns on. Bodies are bounded while they stream in (an image
plus base64 overhead).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import uvicorn

from rx_service.http_access import AccessLog
from rx_service.http_guard import HttpGuard
from shared.security import TokenAuth, warn_if_exposed
from tx_service.engine import TxEngine
from tx_service.openai_api import create_app


@dataclass
class HttpServer:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_http(engine: TxEngine, host: str, port: int) -> HttpServer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    s = engine.settings
    auth = TokenAuth.from_settings(s.auth_token, s.auth_token_file)  # the Tx's own clients' tokens
    # A data: URL is base64 (4/3 of the image) inside JSON.
    app = AccessLog(HttpGuard(create_app(engine), s.max_image_bytes * 4 // 3 + 256 * 1024, auth=auth))
    tls = s.tls_cert is not None and s.tls_key is not None
    warn_if_exposed("Tx HTTP", host, tls=tls, auth=auth is not None)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        log_config=None,
        ssl_certfile=str(s.tls_cert) if tls else None,
        ssl_keyfile=str(s.tls_key) if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tx-http")
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    return HttpServer(server=server, thread=thread, port=sock.getsockname()[1])
