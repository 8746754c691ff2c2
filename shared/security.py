"""Transport security and authentication shared by both services.

- TLS: server credentials from PEM files (optionally requiring client certificates signed by a
  CA: mTLS), channel credentials verifying the server against a CA (and presenting a client
  certificate). CRC-32 in the packet header only catches accidents; integrity and secrecy
  against anyone on the path come from TLS.
- Bearer tokens: accepted tokens come from a file (one per line, `#` comments; re-read when it
  changes, so a revoked token is refused without a restart) and/or an environment setting,
  and are compared in constant time (`hmac.compare_digest`).
- A loud warning when a service binds a non-loopback address without TLS or without tokens.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
from pathlib import Path

import grpc

log = logging.getLogger("splitvlm.security")

MAX_TOKEN_CHARS = 4096


def read_pem(path: Path | str, what: str) -> bytes:
    from shared.errors import ModelError  # FAILED_PRECONDITION-class configuration error

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for a gRPC listener; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))],
        root_certificates=read_pem(client_ca, "client CA") if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a gRPC client: verify the server against `ca` (system roots when None); present
    `cert`/`key` for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both its certificate and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "CA certificate") if ca else None,
        private_key=read_pem(key, "TLS key") if key else None,
        certificate_chain=read_pem(cert, "TLS certificate") if cert else None,
    )


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(service: str, host: str, tls: bool, auth: bool) -> list[str]:
    """Log (and return) loud warnings for a listener reachable off this machine without protection."""
    if is_loopback(host):
        return []
    warnings = []
    if not tls:
        warnings.append(
            f"{service} listens on {host} WITHOUT TLS: packets, prompts and answers cross the network "
            "in plaintext and can be read or altered (CRC-32 is no protection). Set the TLS_CERT / "
            "TLS_KEY settings (splitvlm certs makes dev certificates)."
        )
    if not auth:
        warnings.append(
            f"{service} listens on {host} WITHOUT authentication: anyone who reaches it can use it. "
            "Set an AUTH_TOKEN or AUTH_TOKEN_FILE setting."
        )
    for line in warnings:
        log.warning("*** %s ***", line)
    return warnings


class TokenAuth:
    """Accepted bearer tokens; `check` returns None when a request's header carries one of them."""

    def __init__(self, tokens: list[str] | None = None, token_file: Path | None = None) -> None:
        self._static = [t.encode() for t in (tokens or []) if t]
        self._file = token_file
        self._file_tokens: list[bytes] = []
        self._mtime: float | None = None
        self._lock = threading.Lock()
        self._reload()
        if not self._static and not self._file_tokens:
            raise ValueError(f"no bearer token configured (token file {token_file} is empty?)")

    @classmethod
    def from_settings(cls, token: str | None, token_file: Path | None) -> TokenAuth | None:
        if not token and token_file is None:
            return None
        return cls([token] if token else [], token_file)

    def _reload(self) -> None:
        if self._file is None:
            return
        mtime = os.stat(self._file).st_mtime
        if mtime == self._mtime:
            return
        lines = Path(self._file).read_text().splitlines()
        self._file_tokens = [
            line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")
        ]
        self._mtime = mtime

    def tokens(self) -> list[bytes]:
        with self._lock:
            try:
                self._reload()
            except OSError:
                log.error("cannot read the token file %s; refusing every token until it is back", self._file)
                return list(self._static)
            return self._static + self._file_tokens

    def check(self, authorization: str | bytes | None) -> str | None:
        """None when `authorization` is ``Bearer <accepted token>``, else why not (never the token)."""
        if authorization is None:
            return "missing credentials: send the header `authorization: Bearer <token>`"
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "malformed credentials: expected `authorization: Bearer <token>`"
        candidate = presented.strip().encode()[:MAX_TOKEN_CHARS]
        matched = False
        for token in self.tokens():  # compare with every token: timing does not say which matched
            matched |= hmac.compare_digest(candidate, token)
        return None if matched else "invalid or revoked bearer token"


def bearer_metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The token a client sends: `token`, or the first non-comment line of `token_file`."""
    if token:
        return token
    if token_file is None:
        return None
    for line in Path(token_file).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"token file {token_file} holds no token")


def add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Bind `address` (TLS with `credentials`); a one-line OSError when it cannot be bound.

    Servers set ``grpc.so_reuseport=0``, so a second server on a port in use fails here instead
    of silently sharing the port (and the traffic) with the first.
    """
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(
            f"could not bind the {what} to {address}: the port is in use or the address is not local"
        )
    return bound
