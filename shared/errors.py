"""Errors that cross a service boundary.

Each error knows the gRPC status code and HTTP status it maps to, so both
servers answer the same bad input the same way.
"""

from __future__ import annotations

import grpc


class SplitVlmError(Exception):
    """Base class: a request the services refuse, with a readable reason."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class BadRequestError(SplitVlmError):
    """The request is malformed (missing field, bad option value, unknown field)."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class PacketError(BadRequestError):
    """A feature packet cannot be parsed: truncated, malformed or inconsistent."""


class PacketTooLargeError(SplitVlmError):
    """A packet or a tensor it declares is larger than the configured bound."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class ChecksumError(SplitVlmError):
    """The payload does not match its checksum: it was corrupted in transit."""

    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 422


class VersionError(SplitVlmError):
    """The packet was written in a wire-format version this side cannot read."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 422


class FingerprintMismatchError(SplitVlmError):
    """Tx and Rx do not hold the same model or the same codec."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class CodecError(BadRequestError):
    """A codec spec is invalid, or a payload does not decode under its codec."""


class ImageError(SplitVlmError):
    """The upload is not an image this service can decode."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 415


class ModelError(SplitVlmError):
    """A model cannot be loaded or split (unsupported architecture, missing files)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 422


class UpstreamError(SplitVlmError):
    """The Rx service could not be reached or failed while serving the Tx."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502


class RemoteError(SplitVlmError):
    """A peer service refused or failed a call; keeps the peer's status code."""

    def __init__(self, code: grpc.StatusCode, detail: str, peer: str = "") -> None:
        super().__init__(f"{peer + ': ' if peer else ''}{code.name}: {detail}")
        self.grpc_code = code
        self.detail = detail
        self.http_status = _HTTP_FOR_GRPC.get(code, 502)


_HTTP_FOR_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.DATA_LOSS: 422,
    grpc.StatusCode.UNIMPLEMENTED: 422,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class SettingError(SplitVlmError):
    """A setting is invalid or cannot be honoured (e.g. its port is taken); names the setting and the fix."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500


def port_in_use(what: str, host: str, port: int, setting: str) -> SettingError:
    """The one-line error for a port another process holds; `setting` is the env variable that moves it."""
    return SettingError(
        f"{what} port {port} on {host} is in use by another process: stop it, or choose another port "
        f"with {setting} (or its flag, see `splitvlm config show`)"
    )
