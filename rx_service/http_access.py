"""Access log and request counters for the Rx HTTP API: one line per request (`shared.logs`)."""

from __future__ import annotations

import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.logs import log_access
from shared.metrics import IN_FLIGHT

REQUEST_ID_HEADER = b"x-request-id"


class AccessLog:
    """ASGI middleware: method, path, status, bytes in/out, time to first body byte, total time.

    The request id is the client's ``X-Request-Id`` or a new one; it is echoed in the response.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers", []))
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")[:128] or uuid.uuid4().hex
        status = 0
        bytes_in = bytes_out = 0
        first_body: float | None = None

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            bytes_in += len(message.get("body", b""))
            return message

        logged = False

        def log_line() -> None:
            nonlocal logged
            logged = True
            log_access(
                "rx",
                f"{scope.get('method', '')} {scope.get('path', '')}",
                str(status or 500),
                bytes_in=bytes_in,
                bytes_out=bytes_out,
                ms=(time.perf_counter() - started) * 1e3,
                request_id=request_id,
                ttft_ms=None if first_body is None else first_body * 1e3,
            )

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out, first_body
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER, request_id.encode("latin-1"))]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and first_body is None:
                    first_body = time.perf_counter() - started
                bytes_out += len(body)
                if not message.get("more_body", False):
                    log_line()  # before the last bytes leave: the line exists when the client has them
            await send(message)

        IN_FLIGHT.labels("rx").inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            IN_FLIGHT.labels("rx").dec()
            if not logged:  # the app failed, or the client left before the end
                log_line()
