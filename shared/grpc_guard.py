"""One gRPC server interceptor for both services: authentication, undecodable requests, catch-all.

    call ─► token check (metadata `authorization: Bearer …`) ─► request deserializer (guarded)
         ─► handler ─► unexpected exception? ─► INTERNAL with an error id (details only in the log)

- gRPC answers INTERNAL ("Exception deserializing request!") when a request deserializer
  raises; the guarded deserializer returns an `Undecodable` marker instead, and the handler
  is answered INVALID_ARGUMENT.
- A handler's unexpected exception would reach the client as UNKNOWN with Python's message;
  it becomes INTERNAL naming an error id that is logged with the traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared.errors import BadRequestError
from shared.security import TokenAuth

log = logging.getLogger("splitvlm.grpc")

# Methods that answer without a token (liveness probes).
OPEN_METHODS = ("/grpc.health.v1.Health/",)


class Undecodable:
    """Stands in for a request message that did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _guarded_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return Undecodable(exc)

    return parse


def _bad_message(marker: Undecodable) -> BadRequestError:
    return BadRequestError(
        f"request message is not a valid protobuf of this method's type ({type(marker.error).__name__})"
    )


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for msg in requests:
        if isinstance(msg, Undecodable):
            raise _bad_message(msg)
        yield msg


def _internal(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (error id %s)", method, error_id, exc_info=exc)
    context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal server error (error id {error_id}); the server logged the details",
    )


def _aborted(context: grpc.ServicerContext) -> bool:
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


class GuardInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: TokenAuth | None = None) -> None:
        self.auth = auth

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        refusal = None
        if self.auth is not None and not method.startswith(OPEN_METHODS):
            metadata = dict(details.invocation_metadata or ())
            refusal = self.auth.check(metadata.get("authorization"))
        return _wrap(handler, method, refusal)


def _wrap(handler: Any, method: str, refusal: str | None) -> Any:
    request_streaming, response_streaming = handler.request_streaming, handler.response_streaming
    kind = ("stream" if request_streaming else "unary") + "_" + ("stream" if response_streaming else "unary")
    behavior = getattr(handler, kind)

    def prepare(request: Any, context: grpc.ServicerContext) -> Any:
        if refusal is not None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        if request_streaming:
            return _checked_stream(request)
        if isinstance(request, Undecodable):
            raise _bad_message(request)
        return request

    if response_streaming:

        def run_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(prepare(request, context), context)
            except BadRequestError as exc:
                if _aborted(context):
                    raise
                context.abort(exc.grpc_code, str(exc))
            except Exception as exc:
                if _aborted(context):
                    raise
                _internal(context, method, exc)

        new_behavior: Callable[..., Any] = run_stream
    else:

        def run_unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(prepare(request, context), context)
            except BadRequestError as exc:
                if _aborted(context):
                    raise
                context.abort(exc.grpc_code, str(exc))
            except Exception as exc:
                if _aborted(context):
                    raise
                _internal(context, method, exc)

        new_behavior = run_unary

    factory = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(
        new_behavior,
        request_deserializer=_guarded_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
