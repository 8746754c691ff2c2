"""The Tx HTTP server: the OpenAI-compatible app (tx_service/openai_api.py) on its own port.

Off by default (`SPLITVLM_TX_HTTP_ENABLED=1` or `splitvlm tx serve --http`): an edge box
exposes only what its operator turns on. Bodies are bounded while they stream in (an image
plus base64 overhead).
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import uvicorn

from rx_service.http_app import wrap_app
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
    # A data: URL is base64 (4/3 of the image) inside JSON.
    app = wrap_app(create_app(engine), engine.settings.max_image_bytes * 4 // 3 + 256 * 1024)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tx-http")
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    return HttpServer(server=server, thread=thread, port=sock.getsockname()[1])
