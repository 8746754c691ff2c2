"""Read a client-streamed Generate call with idle and total timeouts.

gRPC's synchronous request iterator blocks without a timeout, so a client that sends
`start` and then nothing would hold a server thread for ever (6 such streams used to starve
the 4-thread pool: Info and valid Generate calls timed out). A pump thread reads the
iterator into a queue; the handler waits on the queue with a timeout and gives up with
DEADLINE_EXCEEDED, which ends the call (and so the pump, whose next read then fails).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc

from shared.errors import PacketError, SplitVlmError
from shared.protocol import pb


class StreamTimeoutError(SplitVlmError):
    """The client stopped sending in the middle of a request."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


_END = object()


class StreamReader:
    def __init__(
        self, requests: Iterator[pb.GenerateRequest], idle_timeout_s: float, total_timeout_s: float
    ) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._idle = idle_timeout_s
        self._deadline = time.monotonic() + total_timeout_s
        self._total = total_timeout_s
        self._pump = threading.Thread(target=self._run, args=(requests,), daemon=True, name="rx-stream")
        self._pump.start()

    def _run(self, requests: Iterator[pb.GenerateRequest]) -> None:
        try:
            for msg in requests:
                self._queue.put(msg)
        except Exception as exc:  # the call ended (cancelled, aborted) or a message was undecodable
            self._queue.put(exc)
        self._queue.put(_END)

    def next(self) -> pb.GenerateRequest | None:
        """The next message, None at the end of the stream; StreamTimeoutError when the client stalls."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise StreamTimeoutError(f"the request was not fully sent within {self._total:g} s")
        try:
            item = self._queue.get(timeout=min(self._idle, remaining))
        except queue.Empty:
            if remaining <= self._idle:
                raise StreamTimeoutError(f"the request was not fully sent within {self._total:g} s") from None
            raise StreamTimeoutError(
                f"no message for {self._idle:g} s in the middle of a request; the Rx closes idle streams"
            ) from None
        if item is _END:
            self._queue.put(_END)
            return None
        if isinstance(item, SplitVlmError):
            raise item
        if isinstance(item, Exception):
            raise PacketError(f"the request stream broke off ({type(item).__name__})")
        assert isinstance(item, pb.GenerateRequest)
        return item

    def payload(self, declared: int) -> bytes:
        """Every payload chunk after `start`, at most `declared` bytes in all."""
        buf = bytearray()
        while (msg := self.next()) is not None:
            if msg.WhichOneof("part") != "payload_chunk":
                raise PacketError("after `start`, every GenerateRequest message must carry `payload_chunk`")
            if len(buf) + len(msg.payload_chunk) > declared:
                raise PacketError(f"received more payload than the {declared} bytes the header declares")
            buf.extend(msg.payload_chunk)
        return bytes(buf)
