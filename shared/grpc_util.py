"""Small gRPC helpers shared by the clients."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import TypeVar

import grpc

from shared.errors import RemoteError

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 2**20),
    ("grpc.max_send_message_length", 32 * 2**20),
    # Reconnect soon after a peer restarts (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel to `address`: TLS with `credentials` (`shared.security.channel_credentials`),
    plaintext without."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def relay_errors(stream: Iterator[T], peer: str) -> Iterator[T]:
    """Re-raise gRPC errors of a response stream as RemoteError (status code kept)."""
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise as_remote_error(exc, peer) from None


def as_remote_error(exc: grpc.RpcError, peer: str) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return RemoteError(code, detail or "", peer)


def port_is_taken(host: str, port: int) -> bool:
    """Whether another socket listens on HOST:PORT (checked before gRPC binds, so that a taken port
    gives our one-line error instead of gRPC's C-core log)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # gRPC reports an unresolvable host itself
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False
