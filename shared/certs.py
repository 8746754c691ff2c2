"""`splitvlm certs`: a development CA and TLS certificates for the Rx, the Tx and a client.

    ca.pem / ca.key          the CA (verifies the Rx for the Tx, and the Tx for the Rx under mTLS)
    rx.pem / rx.key          Rx server certificate (gRPC and HTTP)
    tx.pem / tx.key          Tx certificate: its own listener, and its client certificate for mTLS
    client.pem / client.key  a client certificate for users of the Tx/Rx (tests, curl)

Names in every server certificate: localhost, 127.0.0.1, ::1, the service name (rx, tx: the
compose service names) and any `--host` given. ECDSA P-256 keys, 1-year validity by default.
For production, use certificates from your own CA; these keys are written unencrypted.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(out: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_dev_certs(out: Path, hosts: list[str] | None = None, days: int = 365) -> list[Path]:
    """Write a CA and rx/tx/client certificates signed by it into `out`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitvlm dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out, "ca", ca, ca_key)
    base = ["localhost", "127.0.0.1", "::1", *(hosts or [])]
    usages = {
        "rx": [ExtendedKeyUsageOID.SERVER_AUTH],
        "tx": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }
    for name, eku in usages.items():
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"splitvlm {name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        )
        if ExtendedKeyUsageOID.SERVER_AUTH in eku:
            builder = builder.add_extension(_san([*base, name]), critical=False)
        _write(out, name, builder.sign(ca_key, hashes.SHA256()), key)
    return sorted(out.glob("*.pem")) + sorted(out.glob("*.key"))
