"""The Tx's OpenAI-compatible API: an OpenAI client at the edge gets split inference.

    OpenAI chat request ─► one image (data: URL or file:// under an allowed folder) + prompt
        ─► TxEngine.ask: processor ─► vision encoder ─► codec ─► Rx ─► text
        ─► ChatCompletion, or OpenAI SSE chunks ending with `data: [DONE]`

The image never leaves the device: only the feature packet goes to the Rx. Remote
`http(s)://` image URLs are refused (400): the Tx does not fetch from the network.

POST /v1/chat/completions   OpenAI chat completions (text + one image_url part)
GET  /v1/models             the model this Tx (and its Rx) serve
POST /v1/encode             image (multipart field `image`, or the raw body) -> serialized
                            FeaturePacket bytes, for the Rx's /v1/generate or /v1/features
GET  /healthz               liveness
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from shared import __version__
from shared.errors import BadRequestError, ImageError, PacketTooLargeError, SplitVlmError
from shared.images import decode_image
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
from shared.protocol.packet import packet_to_bytes
from tx_service.engine import TxEngine

_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.ASCII)


def image_from_url(url: str, field: str, max_bytes: int, roots: list[Path]) -> bytes:
    """The bytes of the image an `image_url` names: a base64 `data:` URL or a `file://` path."""
    if url.startswith("data:"):
        match = _DATA_URL_RE.match(url)
        if match is None:
            raise BadRequestError(
                f"invalid chat request: {field}: a data: URL must be base64 (data:image/png;base64,...)"
            )
        encoded = url[match.end() :]
        if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
            raise PacketTooLargeError(f"{field}: the image is over the limit of {max_bytes} bytes")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError(
                f"invalid chat request: {field}: the data: URL is not valid base64"
            ) from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BadRequestError(f"invalid chat request: {field}: file:// URLs name local files only")
        if not roots:
            raise BadRequestError(
                f"invalid chat request: {field}: file:// URLs are off on this Tx; allow folders with "
                "SPLITVLM_TX_HTTP_FILE_ROOTS or --file-root, or send a data: URL"
            )
        path = Path(unquote(parsed.path)).resolve()
        if not any(path.is_relative_to(root.resolve()) for root in roots):
            raise BadRequestError(f"invalid chat request: {field}: {path} is outside the allowed folders")
        if not path.is_file():
            raise ImageError(f"{field}: no such image file: {path}")
        if path.stat().st_size > max_bytes:
            raise PacketTooLargeError(f"{field}: {path} is {path.stat().st_size} bytes; limit {max_bytes}")
        return path.read_bytes()
    if parsed.scheme in ("http", "https"):
        raise BadRequestError(
            f"invalid chat request: {field}: remote image URLs are not fetched (the Tx keeps images on the "
            "device and does not reach the network); send a data: URL or a file:// path"
        )
    raise BadRequestError(f"invalid chat request: {field}: use a data: URL or a file:// path")


def create_app(engine: TxEngine) -> FastAPI:
    app = FastAPI(title="splitvlm Tx", version=__version__)
    settings = engine.settings

    @app.exception_handler(SplitVlmError)
    async def _on_error(request: Request, exc: SplitVlmError) -> JSONResponse:
        REQUESTS.labels("tx", request.url.path, str(exc.http_status)).inc()
        return JSONResponse(status_code=exc.http_status, content=openai_error(exc))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=engine.model_id)]).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        chat = parse_chat_request(await request.body())
        check_model(chat.model, engine.model_id)
        turn = chat_turn(chat, 32, 1024)
        field = next(
            f"messages.{i}.content.{j}.image_url.url"
            for i, m in enumerate(chat.messages)
            if isinstance(m.content, list)
            for j, p in enumerate(m.content)
            if p.type == "image_url"
        )
        image = image_from_url(turn.image_url, field, settings.max_image_bytes, settings.http_file_roots)
        chunks = engine.ask(image, turn.prompt, turn.options)
        first = await run_in_threadpool(next, chunks)  # every check fails as an HTTP error, not mid-stream
        rest = _chain(first, chunks)
        REQUESTS.labels("tx", "/v1/chat/completions", "200").inc()
        if chat.stream:
            return StreamingResponse(
                sse_events(chat.model, rest, turn.options, turn.include_usage), media_type="text/event-stream"
            )
        completion = await run_in_threadpool(completion_from_chunks, chat.model, rest, turn.options)
        return JSONResponse(completion.model_dump())

    @app.post("/v1/encode")
    async def encode(request: Request) -> Response:
        codec = request.query_params.get("codec", "")
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadRequestError("multipart field `image` (an image file) is required")
            data = await upload.read(settings.max_image_bytes + 1)
            form_codec = form.get("codec")
            codec = form_codec if isinstance(form_codec, str) and form_codec else codec
        else:
            data = await request.body()
        packet, header = await run_in_threadpool(encode_image, engine, data, codec)
        return Response(
            packet,
            media_type="application/octet-stream",
            headers={
                "X-Splitvlm-Codec": header.codec_spec,
                "X-Splitvlm-Payload-Bytes": str(header.payload_size),
                "Content-Disposition": 'attachment; filename="packet.bin"',
            },
        )

    return app


def encode_image(engine: TxEngine, data: bytes, codec: str = "") -> tuple[bytes, Any]:
    """An image file's bytes to a serialized FeaturePacket (and its header)."""
    image = decode_image(data, engine.settings.max_image_bytes, engine.settings.max_image_pixels)
    encoded = engine.encode(image, codec)
    return packet_to_bytes(encoded.header, encoded.payload), encoded.header


def _chain(first: Any, rest: Any) -> Any:
    yield first
    yield from rest
