"""The Rx HTTP app's outer layer: authentication, body bounds, slow clients, catch-all.

    connection ─► TimedH11Protocol (request headers within header_timeout_s)
               ─► HttpGuard: bearer token (except open paths) ─► body ≤ max_bytes, each body
                  read within body_timeout_s ─► FastAPI app
               ◄─ an unexpected exception: logged with an error id; the client gets a JSON 500
                  naming the id, and the keep-alive connection stays usable

Starlette's error middleware re-raises after answering, and uvicorn then closes the
connection; HttpGuard swallows that re-raise (the handler already answered and logged).
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.errors import PacketTooLargeError, SplitVlmError
from shared.security import TokenAuth

log = logging.getLogger("splitvlm.rx.http")

ALWAYS_OPEN = ("/healthz", "/readyz")


class BodyTimeoutError(SplitVlmError):
    """The client stopped sending its request body."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


async def _json(send: Send, status: int, error: str, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HttpGuard:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout_s: float = 30.0,
        auth: TokenAuth | None = None,
        open_paths: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.auth = auth
        self.open_paths = ALWAYS_OPEN + tuple(open_paths)

    def _is_open(self, path: str) -> bool:
        # "/docs" opens "/docs" and "/docs/oauth2-redirect"; "/openapi.json" goes with "/docs".
        for prefix in self.open_paths:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return True
        return path == "/openapi.json" and "/docs" in self.open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if self.auth is not None and not self._is_open(scope["path"]):
            refusal = self.auth.check(headers.get(b"authorization"))
            if refusal is not None:
                await _json(send, 401, "Unauthenticated", refusal, [(b"www-authenticate", b"Bearer")])
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            detail = f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}"
            await _json(send, 413, "PacketTooLargeError", detail, [])
            return
        seen = 0
        body_done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body: waits for a disconnect (e.g. during SSE), no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeoutError(
                    f"no request body bytes for {self.body_timeout_s:g} s; the Rx closes slow uploads"
                ) from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PacketTooLargeError(f"request body exceeds the limit of {self.max_bytes} bytes")
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except Exception as exc:
            if started:  # the app's handler answered (and logged) already
                return
            log.error("unexpected error in %s outside the app's handlers", scope["path"], exc_info=exc)
            await _json(
                send, 500, "InternalError", "internal server error; the server logged the details", []
            )


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers (uvicorn has none: a client
    sending one header byte a minute would hold a connection for ever)."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        # IDLE: the request line and headers of the current request have not all arrived.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def timed_h11(header_timeout_s: float) -> type[TimedH11Protocol]:
    return type("TimedH11", (TimedH11Protocol,), {"header_timeout_s": header_timeout_s})
