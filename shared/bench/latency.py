"""End-to-end latency vs uplink bandwidth, modelled and measured through a throttled link.

Model, for one request (one image, one question):

    latency(R) = Tx compute + RTT + uplink bytes * 8 / R + Rx compute

with the compute terms measured (medians) and the bytes measured per request. The
answer's few bytes on the way back are neglected (they ride the second half of the RTT).

`ThrottledProxy` is a real link to validate that model on loopback without root: a TCP
proxy whose uplink (client → server) is a serializer at R bit/s (a token bucket whose
bucket holds one segment of at most `segment` bytes, so there is no burst) and whose two
directions each add RTT/2 of propagation delay.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def transfer_ms(nbytes: float, mbps: float) -> float:
    """Milliseconds to push `nbytes` through `mbps` Mbit/s."""
    return nbytes * 8.0 / (mbps * 1e6) * 1e3


@dataclass(frozen=True)
class PathCost:
    """What one inference path costs per request: compute on each side and uplink bytes."""

    name: str
    tx_ms: float
    rx_ms: float
    uplink_bytes: float

    def latency_ms(self, mbps: float, rtt_ms: float) -> float:
        return self.tx_ms + rtt_ms + transfer_ms(self.uplink_bytes, mbps) + self.rx_ms

    def curve(self, bandwidths: Sequence[float], rtt_ms: float) -> list[float]:
        return [self.latency_ms(b, rtt_ms) for b in bandwidths]


def crossover_mbps(split: PathCost, cloud: PathCost) -> float | None:
    """The uplink rate below which `split` is faster end to end than `cloud`.

    Latencies are a + b/R: split wins below R* = (b_cloud - b_split) / (a_split - a_cloud)
    when it sends fewer bytes but computes longer; inf when it wins at every rate, None when
    it never does.
    """
    da = (split.tx_ms + split.rx_ms) - (cloud.tx_ms + cloud.rx_ms)  # ms
    db = (cloud.uplink_bytes - split.uplink_bytes) * 8 / 1e3  # ms x Mbit/s
    if db <= 0:
        return None  # split sends as much or more: it can only win on compute, at high rates
    if da <= 0:
        return math.inf
    return db / da


class ThrottledProxy:
    """A loopback TCP proxy to `upstream` with a rate-limited uplink and RTT/2 delay each way.

    >>> with ThrottledProxy("127.0.0.1:50061", mbps=2, rtt_ms=40) as proxy:
    ...     ...  # connect clients to proxy.address
    """

    def __init__(self, upstream: str, mbps: float, rtt_ms: float, segment: int = 1460) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.rate_bytes_s, self.delay_s = math.inf, 0.0
        self.set_link(mbps, rtt_ms)
        self.segment = segment
        self.bytes_up = 0  # client → server bytes forwarded so far
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, name="throttle-accept", daemon=True)
        self._accept.start()

    def set_link(self, mbps: float, rtt_ms: float) -> None:
        """Change the link (between requests): `mbps` inf for no rate limit, `rtt_ms` 0 for no delay."""
        self.rate_bytes_s = mbps * 1e6 / 8.0
        self.delay_s = rtt_ms / 2e3

    def __enter__(self) -> ThrottledProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=2)
        self._accept.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            self._pipe(client, server, throttled=True)
            self._pipe(server, client, throttled=False)

    def _pipe(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        """Reader thread: timestamps each segment's delivery; writer thread: delivers on time."""
        queue: list[tuple[float, int, bytes | None]] = []
        ready = threading.Condition()
        order = itertools.count()
        link_free = [0.0]

        def reader() -> None:
            while not self._stop.is_set():
                try:
                    data = src.recv(self.segment if throttled else 65536)
                except OSError:
                    data = b""
                now = time.monotonic()
                if data and throttled:
                    depart = max(now, link_free[0]) + len(data) / self.rate_bytes_s
                    link_free[0] = depart
                else:
                    depart = now
                with self._lock:
                    if throttled:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                with ready:
                    heapq.heappush(queue, (depart + self.delay_s, next(order), data or None))
                    ready.notify()
                if not data:
                    return

        def writer() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, _, data = queue[0]
                    wait = due - time.monotonic()
                    if wait > 0:
                        ready.wait(wait)
                        continue
                    heapq.heappop(queue)
                if data is None:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        for fn in (reader, writer):
            t = threading.Thread(target=fn, daemon=True, name=f"throttle-{fn.__name__}")
            t.start()
            self._threads.append(t)


# ---------------------------------------------------------------------------- cloud-only upload


def _send_frames(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(struct.pack("!I", len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        buf += chunk
    return bytes(buf)


def _recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack("!I", _recv_exact(sock, 4))
        out.append(_recv_exact(sock, n))
    return out


class UploadServer:
    """A minimal cloud-only server on loopback: receives (image bytes, question) over TCP, runs
    `handler` (decode + the whole model), replies (answer, server milliseconds)."""

    def __init__(self, handler: Callable[[bytes, str], str]) -> None:
        self._handler = handler
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True, name="upload-server")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                data, question = _recv_frames(conn, 2)
                start = time.perf_counter()
                answer = self._handler(data, question.decode())
                ms = (time.perf_counter() - start) * 1e3
                _send_frames(conn, answer.encode(), repr(ms).encode())

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(timeout=2)


class UploadClient:
    """One persistent connection to an `UploadServer` (through a proxy, say)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._sock = socket.create_connection((host, int(port)))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ask(self, data: bytes, question: str) -> tuple[str, float]:
        """(answer, server ms)."""
        _send_frames(self._sock, data, question.encode())
        answer, ms = _recv_frames(self._sock, 2)
        return answer.decode(), float(ms.decode())

    def close(self) -> None:
        self._sock.close()
