"""Bearer tokens on both protocols (issue 12): missing, wrong and revoked tokens refused,
health open, the Tx forwarding its token to the Rx."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rx_service.client import RxClient
from shared.errors import RemoteError
from shared.security import TokenAuth


def _info_code(address: str, token: str | None) -> grpc.StatusCode:
    with RxClient(address, timeout_s=10, token=token) as client:
        try:
            client.info()
        except RemoteError as exc:
            return exc.grpc_code
    return grpc.StatusCode.OK


def test_grpc_requires_the_token_and_health_stays_open(make_rx: Any) -> None:
    server = make_rx(http=False, auth_token="correct-horse")
    assert _info_code(server.grpc_address, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _info_code(server.grpc_address, "wrong") == grpc.StatusCode.UNAUTHENTICATED
    assert _info_code(server.grpc_address, "correct-horse") == grpc.StatusCode.OK
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "splitvlm.v1.RxService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with RxClient(server.grpc_address, timeout_s=10) as client, pytest.raises(RemoteError) as info:
        client.info()
    assert "Bearer" in info.value.detail and "correct-horse" not in info.value.detail


def test_http_requires_the_token_except_health_and_public_paths(make_rx: Any) -> None:
    server = make_rx(auth_token="correct-horse", public_paths=["/metrics"])
    url = server.http_url
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(url + path).status_code == 200, path
    for path in ("/v1/info", "/docs", "/openapi.json"):
        resp = httpx.get(url + path)
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", path
    assert httpx.post(url + "/v1/generate", data={"prompt": "hi"}).status_code == 401
    assert httpx.get(url + "/v1/info", headers={"authorization": "Bearer nope"}).status_code == 401
    ok = httpx.get(url + "/v1/info", headers={"authorization": "Bearer correct-horse"})
    assert ok.status_code == 200 and ok.json()["service"] == "rx"
    assert httpx.get(url + "/readyz").json()["status"] == "ready"


def test_token_file_revocation_takes_effect_without_restart(make_rx: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted tokens\nalpha\nbravo\n")
    server = make_rx(http=False, auth_token_file=tokens)
    assert _info_code(server.grpc_address, "bravo") == grpc.StatusCode.OK
    tokens.write_text("alpha\n")  # bravo revoked
    future = time.time() + 5
    os.utime(tokens, (future, future))  # a new mtime even on coarse-timestamp file systems
    assert _info_code(server.grpc_address, "bravo") == grpc.StatusCode.UNAUTHENTICATED
    assert _info_code(server.grpc_address, "alpha") == grpc.StatusCode.OK


def test_tx_forwards_its_token_and_refuses_to_pair_without(
    make_rx: Any, cache_dir: Path, images: list
) -> None:
    from shared.config import TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    rx = make_rx(http=False, auth_token="rx-secret")
    settings = TxSettings(port=0, rx_address=rx.grpc_address, cache_dir=cache_dir)
    with pytest.raises(RemoteError) as info:
        start_tx(settings, require_rx=True)
    assert info.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    tx = start_tx(settings.model_copy(update={"rx_auth_token": "rx-secret"}), require_rx=True)
    try:
        with TxClient(tx.address, timeout_s=30) as client:
            assert client.ask(images[0], "What is in the image?", max_new_tokens=2).token_ids
    finally:
        tx.stop()


def test_token_check_is_exact() -> None:
    auth = TokenAuth(["s3cret"])
    assert auth.check("Bearer s3cret") is None
    assert auth.check("bearer s3cret") is None  # the scheme is case-insensitive
    for header in (
        None,
        "",
        "Bearer",
        "Basic s3cret",
        "Bearer s3cre",
        "Bearer s3cret2",
        "Bearer " + "x" * 10**5,
    ):
        assert auth.check(header) is not None, header
    with pytest.raises(ValueError):
        TokenAuth([])


def test_openapi_describes_the_generate_body_and_its_errors(rx: Any) -> None:
    schema = httpx.get(f"{rx.http_url}/openapi.json").json()  # the session Rx has no token
    operation = schema["paths"]["/v1/generate"]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"packet", "prompt"} <= set(body["required"])
    assert body["properties"]["packet"]["format"] == "binary"
    assert {"400", "401", "409", "413", "422", "429"} <= set(operation["responses"])
