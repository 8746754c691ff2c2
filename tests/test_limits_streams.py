"""Bounded work (issue 12): idle and slow clients time out and never starve the server; a full
queue answers RESOURCE_EXHAUSTED / 429 with Retry-After; per-request deadlines."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from rx_service.client import RxClient
from shared.errors import RemoteError
from shared.protocol import pb, pb_grpc
from shared.protocol.packet import packet_to_bytes
from shared.split import GenerationOptions

PROMPT = "What is in the image?"


def _packet(tx: Any, image: Any) -> tuple[pb.FeatureHeader, bytes]:
    encoded = tx.engine.encode(image, "int8")
    return encoded.header, encoded.payload


def _idle_stream(stub: Any, header: pb.FeatureHeader, release: threading.Event, out: list) -> None:
    """Send `start`, then nothing until `release` (the probe's idle Generate)."""

    def requests() -> Iterator[pb.GenerateRequest]:
        yield pb.GenerateRequest(start=pb.GenerateStart(header=header, prompt=PROMPT))
        release.wait(60)

    try:
        list(stub.Generate(requests(), timeout=60))
        out.append(grpc.StatusCode.OK)
    except grpc.RpcError as exc:
        out.append(exc.code())


def test_six_idle_streams_do_not_starve_info_or_generate(rx: Any, tx: Any, images: list) -> None:
    header, payload = _packet(tx, images[0])
    release, codes = threading.Event(), []
    with grpc.insecure_channel(rx.grpc_address) as channel:
        stub = pb_grpc.RxServiceStub(channel)
        threads = [
            threading.Thread(target=_idle_stream, args=(stub, header, release, codes)) for _ in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # let all six reach the server
        try:
            with RxClient(rx.grpc_address, timeout_s=10) as client:
                assert client.info().service == "rx"
                answer = client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=3))
                assert answer.token_ids
            assert codes == []  # the idle streams are still open
        finally:
            release.set()
            for t in threads:
                t.join(30)
    # Half-closed without the payload: a truncated request, a client error.
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6


def test_idle_stream_times_out_with_deadline_exceeded(make_rx: Any, tx: Any, images: list) -> None:
    server = make_rx(http=False, stream_idle_timeout_s=0.5)
    header, _ = _packet(tx, images[0])
    release, codes = threading.Event(), []
    with grpc.insecure_channel(server.grpc_address) as channel:
        started = time.monotonic()
        _idle_stream(pb_grpc.RxServiceStub(channel), header, release, codes)
        waited = time.monotonic() - started
    release.set()
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert waited < 30  # closed by the server's idle timeout, not by the client's 60 s deadline


def _raw_http(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<still open>")
        return b"".join(chunks)


def test_http_slow_headers_are_cut_off(make_rx: Any) -> None:
    server = make_rx(http_header_timeout_s=0.5)
    # Headers never finish (no blank line): the server closes the connection.
    assert _raw_http(server.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1") == b""
    # A complete request on a fresh connection is answered.
    assert httpx.get(f"{server.http_url}/healthz").status_code == 200


def test_http_slow_body_gets_408(make_rx: Any) -> None:
    server = make_rx(http_body_timeout_s=0.5)
    head = (
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: 1000\r\n\r\n--B\r\n"
    )
    reply = _raw_http(server.http_port, head)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"no request body bytes" in reply


def test_full_queue_is_resource_exhausted_and_429_with_retry_after(
    make_rx: Any, tx: Any, images: list
) -> None:
    server = make_rx(max_concurrent_requests=1, max_queued_requests=0)
    header, payload = _packet(tx, images[0])
    admission = server.engine.admission_control()
    admission.acquire()  # a generation in progress holds the only slot
    try:
        with RxClient(server.grpc_address, timeout_s=30) as client, pytest.raises(RemoteError) as info:
            client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=2))
        assert info.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy" in info.value.detail and "retry after" in info.value.detail
        resp = httpx.post(
            f"{server.http_url}/v1/generate",
            files={"packet": ("p.bin", packet_to_bytes(header, payload))},
            data={"prompt": PROMPT, "max_new_tokens": "2"},
            timeout=30,
        )
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    finally:
        admission.release(0.1)
    with RxClient(server.grpc_address, timeout_s=30) as client:
        assert client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=2)).token_ids


def test_queued_request_waits_then_is_refused_or_times_out(make_rx: Any, tx: Any, images: list) -> None:
    header, payload = _packet(tx, images[0])
    queued = make_rx(http=False, max_queued_requests=1, queue_timeout_s=0.3)
    deadline = make_rx(http=False, max_queued_requests=1, request_timeout_s=0.3)
    for server, code, needle in [
        (queued, grpc.StatusCode.RESOURCE_EXHAUSTED, "no slot within 0.3 s"),
        (deadline, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while it was queued"),
    ]:
        admission = server.engine.admission_control()
        admission.acquire()
        try:
            with RxClient(server.grpc_address, timeout_s=30) as client, pytest.raises(RemoteError) as info:
                client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=2))
            assert info.value.grpc_code == code and needle in info.value.detail
        finally:
            admission.release(0.1)


def test_second_server_on_a_bound_port_fails(rx: Any, make_rx: Any) -> None:
    port = int(rx.grpc_address.rsplit(":", 1)[1])
    from shared.errors import SettingError

    # Checked before the model loads (a one-line SettingError), and again at bind time (OSError).
    with pytest.raises((OSError, SettingError), match=r"could not bind|is in use"):
        make_rx(http=False, grpc_port=port)
