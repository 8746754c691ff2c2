"""The Rx's OpenAI-compatible routes and stored features (mounted by rx_service/http_app.py).

POST /v1/chat/completions  OpenAI chat request whose one image_url part names stored features:
                           splitvlm://features/<id> or splitvlm://streams/<stream id>/latest
                           (JSON, or OpenAI SSE chunks ending with `data: [DONE]` when stream=true)
GET  /v1/models            the model this Rx serves
POST /v1/features          a serialized FeaturePacket (multipart field `packet`, or the raw body)
                           -> {"id": ...}; validated exactly as /v1/generate validates it
GET  /v1/streams           streams with their latest frame, frames kept and rate
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rx_service import streams
from rx_service.engine import RxEngine
from shared.errors import BadRequestError, PacketError, SplitVlmError
from shared.metrics import REQUESTS
from shared.openai_messages import (
    ModelCard,
    ModelList,
    chat_turn,
    check_model,
    completion_from_chunks,
    openai_error,
    parse_chat_request,
    sse_events,
)
from shared.protocol import pb


def openai_router(engine: RxEngine) -> APIRouter:
    router = APIRouter()
    limit = engine.settings.max_packet_bytes + 64 * 1024

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=engine.model_id)]).model_dump()

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        try:
            return await _chat_completions(request)
        except SplitVlmError as exc:  # OpenAI's error shape, so OpenAI clients show the message
            REQUESTS.labels("rx", "/v1/chat/completions", str(exc.http_status)).inc()
            return JSONResponse(status_code=exc.http_status, content=openai_error(exc))

    async def _chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await request.body())
        check_model(chat.model, engine.model_id)
        turn = chat_turn(chat, engine.settings.default_max_new_tokens, engine.settings.max_new_tokens_limit)
        field = _image_field(chat)
        stored = await run_in_threadpool(streams.resolve_url, engine, turn.image_url, field)
        engine.check_request(turn.prompt, turn.options)
        chunks = streams.query(engine, stored, turn.prompt, turn.options)
        # The first chunk is pulled here so that every check fails as an HTTP error, not mid-stream.
        first = await run_in_threadpool(_next_chunk, chunks)
        rest = _chain(first, chunks)
        if chat.stream:
            REQUESTS.labels("rx", "/v1/chat/completions", "200").inc()
            return StreamingResponse(
                sse_events(chat.model, rest, turn.options, turn.include_usage), media_type="text/event-stream"
            )
        completion = await run_in_threadpool(completion_from_chunks, chat.model, rest, turn.options)
        REQUESTS.labels("rx", "/v1/chat/completions", "200").inc()
        return JSONResponse(completion.model_dump())

    @router.post("/v1/features")
    async def upload_features(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("packet")
            if not isinstance(upload, UploadFile):
                raise BadRequestError("multipart field `packet` (a FeaturePacket file) is required")
            data = await upload.read(limit + 1)
        else:
            data = await request.body()
        fid = await run_in_threadpool(streams.store_packet, engine, data)
        return {"id": fid, "bytes": len(data), "url": f"splitvlm://features/{fid}"}

    @router.get("/v1/streams")
    async def list_streams() -> dict[str, Any]:
        store = streams.store_of(engine)
        infos = await run_in_threadpool(store.streams)
        return {"backend": store.kind, "streams": [s.to_dict() for s in infos]}

    return router


def _image_field(chat: Any) -> str:
    for i, message in enumerate(chat.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type == "image_url":
                    return f"messages.{i}.content.{j}.image_url.url"
    return "messages"


def _next_chunk(chunks: Any) -> pb.TextChunk:
    try:
        chunk: pb.TextChunk = next(chunks)
        return chunk
    except StopIteration:
        raise PacketError("generation produced no output") from None


def _chain(first: pb.TextChunk, rest: Any) -> Any:
    yield first
    yield from rest
