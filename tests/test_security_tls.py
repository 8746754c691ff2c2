"""TLS on every listener and client, mTLS for the Tx→Rx hop (issue 12), over loopback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from rx_service.client import RxClient, RxHttpClient
from shared.certs import make_dev_certs
from shared.errors import RemoteError
from shared.protocol.packet import packet_to_bytes
from shared.security import channel_credentials, warn_if_exposed
from shared.split import GenerationOptions

PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_dev_certs(out)
    return out


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated dev CA (and certificates it signed)."""
    out = tmp_path_factory.mktemp("other-certs")
    make_dev_certs(out)
    return out


def _generate(address: str, tx: Any, image: Any, **client_kwargs: Any) -> list[int]:
    encoded = tx.engine.encode(image, "int8")
    with RxClient(address, timeout_s=20, **client_kwargs) as client:
        return client.generate(
            encoded.header, encoded.payload, PROMPT, GenerationOptions(max_new_tokens=3)
        ).token_ids


def test_certs_helper_writes_a_ca_and_certificates(certs: Path) -> None:
    from cryptography import x509

    names = {p.name for p in certs.iterdir()}
    assert {"ca.pem", "ca.key", "rx.pem", "rx.key", "tx.pem", "tx.key", "client.pem", "client.key"} <= names
    rx_cert = x509.load_pem_x509_certificate((certs / "rx.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    rx_cert.verify_directly_issued_by(ca)
    san = rx_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert (certs / "rx.key").stat().st_mode & 0o077 == 0


def test_tls_round_trip_grpc_and_https(
    make_rx: Any, tx: Any, images: list, certs: Path, other_ca: Path
) -> None:
    server = make_rx(tls_cert=certs / "rx.pem", tls_key=certs / "rx.key")
    assert server.http_url.startswith("https://")
    assert _generate(server.grpc_address, tx, images[0], credentials=channel_credentials(certs / "ca.pem"))
    # HTTPS verified against the CA; the same packet over HTTP API.
    encoded = tx.engine.encode(images[0], "int8")
    http = RxHttpClient(server.http_url, verify=str(certs / "ca.pem"))
    try:
        assert http.generate(packet_to_bytes(encoded.header, encoded.payload), PROMPT, max_new_tokens=2)[
            "token_ids"
        ]
    finally:
        http.close()
    # A client trusting another CA, or speaking plaintext, is refused.
    with pytest.raises(RemoteError) as info:
        _generate(server.grpc_address, tx, images[0], credentials=channel_credentials(other_ca / "ca.pem"))
    assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(RemoteError) as info:
        _generate(server.grpc_address, tx, images[0])
    assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.http_url}/healthz", verify=str(other_ca / "ca.pem"))


def test_mtls_requires_a_client_certificate_from_the_ca(
    make_rx: Any, tx: Any, images: list, certs: Path, other_ca: Path
) -> None:
    server = make_rx(
        http=False, tls_cert=certs / "rx.pem", tls_key=certs / "rx.key", tls_client_ca=certs / "ca.pem"
    )
    ca = certs / "ca.pem"
    with pytest.raises(RemoteError) as info:  # no client certificate
        _generate(server.grpc_address, tx, images[0], credentials=channel_credentials(ca))
    assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(RemoteError) as info:  # a certificate another CA signed
        _generate(
            server.grpc_address,
            tx,
            images[0],
            credentials=channel_credentials(ca, other_ca / "tx.pem", other_ca / "tx.key"),
        )
    assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    assert _generate(
        server.grpc_address,
        tx,
        images[0],
        credentials=channel_credentials(ca, certs / "tx.pem", certs / "tx.key"),
    )


def test_tx_to_rx_over_mtls_with_tokens_end_to_end(
    make_rx: Any, images: list, certs: Path, cache_dir: Path
) -> None:
    """Every hop protected: client ─TLS+token─► Tx ─mTLS+token─► Rx."""
    from shared.config import TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    rx = make_rx(
        http=False,
        tls_cert=certs / "rx.pem",
        tls_key=certs / "rx.key",
        tls_client_ca=certs / "ca.pem",
        auth_token="rx-token",
    )
    tx = start_tx(
        TxSettings(
            port=0,
            rx_address=rx.grpc_address,
            cache_dir=cache_dir,
            tls_ca=certs / "ca.pem",
            tls_cert=certs / "tx.pem",
            tls_key=certs / "tx.key",
            rx_auth_token="rx-token",
            auth_token="tx-token",
        ),
        require_rx=True,
    )
    try:
        creds = channel_credentials(certs / "ca.pem")
        with TxClient(tx.address, timeout_s=30, credentials=creds, token="tx-token") as client:
            assert client.ask(images[1], PROMPT, max_new_tokens=3).token_ids
        with (
            TxClient(tx.address, timeout_s=30, credentials=creds) as client,
            pytest.raises(RemoteError) as info,
        ):
            client.ask(images[1], PROMPT, max_new_tokens=3)
        assert info.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        tx.stop()


def test_exposed_plaintext_listener_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="splitvlm.security"):
        assert warn_if_exposed("Rx gRPC", "127.0.0.1", tls=False, auth=False) == []
        warnings = warn_if_exposed("Rx gRPC", "0.0.0.0", tls=False, auth=False)
    assert len(warnings) == 2 and "WITHOUT TLS" in warnings[0] and "WITHOUT authentication" in warnings[1]
    assert "WITHOUT TLS" in caplog.text
    assert warn_if_exposed("Rx gRPC", "0.0.0.0", tls=True, auth=True) == []
