"""The Rx HTTP front end (FastAPI).

GET  /healthz        liveness
GET  /v1/info        model id, fingerprints, codecs
POST /v1/generate    multipart: packet=<FeaturePacket file>, prompt=..., options;
                     JSON answer, or Server-Sent Events with stream=true
                     (or `Accept: text/event-stream`)
GET  /metrics        Prometheus
GET  /docs, /redoc   API docs; their scripts and styles are served from /docs-assets (the
                     fastapi-offline package), so they work without internet
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp

from rx_service.codec_policy import clip
from rx_service.engine import RxEngine
from rx_service.http_access import AccessLog
from rx_service.http_guard import HttpGuard
from rx_service.openai_api import openai_router
from shared import __version__
from shared.admission import OverloadedError
from shared.errors import BadRequestError, PacketError, SplitVlmError
from shared.metrics import PAYLOAD_BYTES, REQUESTS, TOKENS, TTFT
from shared.protocol import pb
from shared.protocol.packet import packet_from_bytes
from shared.security import TokenAuth
from shared.split import GenerationOptions
from shared.split.base import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K

log = logging.getLogger("splitvlm.rx.http")
DOCS_ASSETS = "/docs-assets"
MAX_FORM_PROMPT_CHARS = 65_536  # the engine applies max_prompt_chars; this only bounds the parse


class GenerateForm(BaseModel):
    """The non-file fields of POST /v1/generate; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_FORM_PROMPT_CHARS)
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    stream: bool = False


# The multipart body and the error answers of POST /v1/generate, for the OpenAPI schema (the
# handler parses the form itself, to stream the packet and bound it while it arrives).
_GENERATE_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["packet", "prompt"],
                "properties": {
                    "packet": {
                        "type": "string",
                        "format": "binary",
                        "description": "a serialized FeaturePacket",
                    },
                    **GenerateForm.model_json_schema()["properties"],
                },
            }
        }
    },
}
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}
_GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": what, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for status, what in {
        400: "malformed packet, option or prompt; token count or context exceeded",
        401: "missing or wrong bearer token",
        408: "the request body stalled",
        409: "model, split point or codec not this Rx's",
        413: "packet or body over a size limit",
        422: "checksum mismatch or unsupported packet version",
        429: "generation queue full (see Retry-After)",
        504: "the request ran past its deadline",
    }.items()
}


def _error(exc: SplitVlmError) -> JSONResponse:
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    return JSONResponse(
        status_code=exc.http_status,
        content={"error": type(exc).__name__, "detail": str(exc)},
        headers=headers,
    )


def create_app(engine: RxEngine) -> FastAPI:
    # Swagger UI and ReDoc load their assets from a CDN by default: a blank /docs offline.
    app = FastAPIOffline(title="splitvlm Rx", version=__version__, static_url=DOCS_ASSETS)
    limits = engine.settings.packet_limits()

    @app.exception_handler(SplitVlmError)
    async def _on_error(request: Request, exc: SplitVlmError) -> JSONResponse:
        REQUESTS.labels("rx", request.url.path, str(exc.http_status)).inc()
        return _error(exc)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with an id the client can quote; the client never sees the exception itself.
        error_id = uuid.uuid4().hex[:12]
        log.error("unexpected error in %s (error id %s)", request.url.path, error_id, exc_info=exc)
        REQUESTS.labels("rx", request.url.path, "500").inc()
        return JSONResponse(
            status_code=500,
            content={
                "error": "InternalError",
                "detail": f"internal server error (error id {error_id}); the server logged the details",
            },
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        # The app exists only once the model is loaded; report the queue for load balancers.
        admission = engine.admission_control()
        return {"status": "ready", "running": admission.active, "queued": admission.waiting}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return MessageToDict(engine.info(), preserving_proto_field_name=True)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/generate",
        response_model=None,
        openapi_extra={"requestBody": _GENERATE_BODY},
        responses=_GENERATE_ERRORS,
    )
    async def generate(request: Request) -> Response:
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("packet")
        if not isinstance(upload, UploadFile):
            raise BadRequestError("multipart field `packet` (a FeaturePacket file) is required")
        fields = {k: v for k, v in form.items() if k != "packet"}
        try:
            parsed = GenerateForm.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise BadRequestError(f"invalid form: {clip(problems, 400)}") from None
        data = await upload.read(limits.max_packet_bytes + 64 * 1024 + 1)
        header, payload = packet_from_bytes(data, limits)
        PAYLOAD_BYTES.labels("rx").observe(len(payload))
        options = GenerationOptions(
            max_new_tokens=parsed.max_new_tokens or engine.settings.default_max_new_tokens,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            top_k=parsed.top_k,
            seed=parsed.seed,
        )
        started = time.perf_counter()
        chunks = _counted(engine.generate(header, payload, parsed.prompt, options), started)
        # Pull the first chunk here so that every check (codec, fingerprints, decode)
        # fails as an HTTP error rather than inside an already-started stream.
        first = await run_in_threadpool(_next_chunk, chunks)
        wants_sse = parsed.stream or "text/event-stream" in request.headers.get("accept", "")
        if wants_sse:
            return StreamingResponse(_sse(first, chunks), media_type="text/event-stream")
        rest = await run_in_threadpool(list, chunks)
        REQUESTS.labels("rx", "/v1/generate", "200").inc()
        return JSONResponse(_summarize([first, *rest]))

    app.include_router(openai_router(engine))  # /v1/chat/completions, /v1/models, /v1/features, /v1/streams
    return app


def wrap_app(app: FastAPI, max_body_bytes: int, engine: RxEngine | None = None) -> ASGIApp:
    """The app behind `HttpGuard`: bearer tokens, body size and pace, catch-all (settings of `engine`)."""
    if engine is None:
        return AccessLog(HttpGuard(app, max_body_bytes))
    s = engine.settings
    return AccessLog(
        HttpGuard(
            app,
            max_body_bytes,
            body_timeout_s=s.http_body_timeout_s,
            auth=TokenAuth.from_settings(s.auth_token, s.auth_token_file),
            open_paths=tuple(s.public_paths),
        )
    )


def _counted(chunks: Iterator[pb.TextChunk], started: float) -> Iterator[pb.TextChunk]:
    """Pass chunks through, counting generated tokens and the time to the first one."""
    first = True
    for chunk in chunks:
        if chunk.token_ids and first:
            first = False
            TTFT.labels("rx").observe(time.perf_counter() - started)
        TOKENS.labels("rx").inc(len(chunk.token_ids))
        yield chunk


def _next_chunk(chunks: Iterator[pb.TextChunk]) -> pb.TextChunk:
    try:
        return next(chunks)
    except StopIteration:
        raise PacketError("generation produced no output") from None


def _chunk_dict(chunk: pb.TextChunk) -> dict[str, Any]:
    out: dict[str, Any] = {"text": chunk.text, "token_ids": list(chunk.token_ids)}
    if chunk.done:
        out.update(
            done=True,
            timings_ms=dict(chunk.timings.ms),
            payload_bytes=chunk.payload_bytes,
            request_id=chunk.request_id,
            codec_spec=chunk.codec_spec,
        )
    return out


def _summarize(chunks: list[pb.TextChunk]) -> dict[str, Any]:
    last = chunks[-1]
    return {
        "text": "".join(c.text for c in chunks),
        "token_ids": [t for c in chunks for t in c.token_ids],
        "timings_ms": dict(last.timings.ms),
        "payload_bytes": last.payload_bytes,
        "request_id": last.request_id,
        "codec_spec": last.codec_spec,
    }


def _sse(first: pb.TextChunk, rest: Iterator[pb.TextChunk]) -> Iterator[str]:
    try:
        for chunk in itertools.chain([first], rest):
            event = "done" if chunk.done else "token"
            yield f"event: {event}\ndata: {json.dumps(_chunk_dict(chunk))}\n\n"
    except SplitVlmError as exc:
        yield f"event: error\ndata: {json.dumps({'error': type(exc).__name__, 'detail': str(exc)})}\n\n"
