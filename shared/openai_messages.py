"""The OpenAI chat-completions schema both services speak (pydantic), and its reduction to ours.

    {"messages": [{"role": "user", "content": [{"type": "text", ...}, {"type": "image_url", ...}]}]}
        ─► ChatRequest (validated; a malformed message is a 400 naming the field)
        ─► ChatTurn: one prompt string + the one image URL it is about + GenerationOptions
        ─► our generation ─► ChatCompletion (JSON) or ChatCompletionChunk events (SSE, then [DONE])

A split VLM answers about exactly one image per request (the packet's features), so a
conversation must carry exactly one `image_url` part. Text of earlier turns is kept, as
`Role: text` lines before the last user message, so the prompt the model reads is plain.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import BadRequestError, SplitVlmError
from shared.split import GenerationOptions

# ---- request --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """POST /v1/chat/completions; the fields an OpenAI client sends that we honour or accept."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = None


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate a request body; BadRequestError names each offending field (e.g. messages.0.role)."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{loc}: {err['msg']}")
        raise BadRequestError("invalid chat request: " + "; ".join(problems)) from None


class ChatTurn(BaseModel):
    """What a chat request asks of our pipeline."""

    prompt: str
    image_url: str
    options: GenerationOptions
    include_usage: bool = False

    model_config = ConfigDict(arbitrary_types_allowed=True)


def chat_turn(request: ChatRequest, default_max_new_tokens: int, max_new_tokens_limit: int) -> ChatTurn:
    """One prompt and one image URL from the messages; BadRequestError names what is wrong."""
    images: list[tuple[str, str]] = []  # (field, url)
    lines: list[str] = []
    last_user = max((i for i, m in enumerate(request.messages) if m.role == "user"), default=-1)
    if last_user < 0:
        raise BadRequestError("invalid chat request: messages: no message with role 'user'")
    for i, message in enumerate(request.messages):
        parts = (
            [TextPart(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        texts = []
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart):
                images.append((f"messages.{i}.content.{j}.image_url.url", part.image_url.url))
            else:
                texts.append(part.text)
        text = "\n".join(t for t in texts if t.strip())
        if i == last_user:
            lines.append(text)
        elif text:
            lines.append(f"{message.role.capitalize()}: {text}")
    if not images:
        raise BadRequestError(
            "invalid chat request: messages: no image_url part; the model answers about one image per request"
        )
    if len(images) > 1:
        raise BadRequestError(
            f"invalid chat request: {images[1][0]}: a second image; this model answers about one image "
            "per request"
        )
    prompt = "\n".join(lines).strip()
    if not prompt:
        raise BadRequestError(f"invalid chat request: messages.{last_user}.content: no text (the question)")
    max_new = request.max_completion_tokens or request.max_tokens or default_max_new_tokens
    if max_new > max_new_tokens_limit:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise BadRequestError(f"invalid chat request: {field}: at most {max_new_tokens_limit}, got {max_new}")
    options = GenerationOptions(
        max_new_tokens=max_new,
        temperature=request.temperature or 0.0,
        top_p=request.top_p or 1.0,
        seed=request.seed or 0,
    )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return ChatTurn(prompt=prompt, image_url=images[0][1], options=options, include_usage=include_usage)


# ---- response -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    # Ours, beyond OpenAI's schema (clients ignore unknown fields): what the split sent and spent.
    splitvlm: dict[str, Any] = Field(default_factory=dict)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "splitvlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def finish_reason(completion_tokens: int, options: GenerationOptions) -> Literal["stop", "length"]:
    """`length` when generation ran into max_new_tokens; a stop token is never counted, so
    reaching the limit means it was cut."""
    return "length" if completion_tokens >= options.max_new_tokens else "stop"


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def completion_from_chunks(model: str, chunks: Iterable[Any], options: GenerationOptions) -> ChatCompletion:
    """Collect `pb.TextChunk`s into one ChatCompletion."""
    text: list[str] = []
    ids: list[int] = []
    last = None
    for chunk in chunks:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        last = chunk
    if last is None or not last.done:
        raise BadRequestError("generation ended before its final chunk")
    usage = Usage(
        prompt_tokens=last.prompt_tokens,
        completion_tokens=len(ids),
        total_tokens=last.prompt_tokens + len(ids),
    )
    return ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=model,
        choices=[
            Choice(
                message=AssistantMessage(content="".join(text)),
                finish_reason=finish_reason(len(ids), options),
            )
        ],
        usage=usage,
        splitvlm=_extras(last, ids),
    )


def _extras(last: Any, ids: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "token_ids": ids,
        "payload_bytes": int(last.payload_bytes),
        "codec": last.codec_spec,
        "timings_ms": dict(last.timings.ms),
    }
    if last.feature_id:
        out["feature_id"] = last.feature_id
    return out


def sse_events(
    model: str, chunks: Iterator[Any], options: GenerationOptions, include_usage: bool
) -> Iterator[str]:
    """OpenAI-format Server-Sent Events for a stream of `pb.TextChunk`s, ending with `data: [DONE]`.

    An error mid-stream (the status line is already sent) becomes an `error` event, as OpenAI does.
    """
    cid, created = completion_id(), int(time.time())

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChunkChoice(delta=Delta(role="assistant", content=""))])
    n = 0
    try:
        for chunk in chunks:
            n += len(chunk.token_ids)
            if chunk.text:
                yield event([ChunkChoice(delta=Delta(content=chunk.text))])
            if chunk.done:
                yield event([ChunkChoice(delta=Delta(), finish_reason=finish_reason(n, options))])
                if include_usage:
                    usage = Usage(
                        prompt_tokens=chunk.prompt_tokens,
                        completion_tokens=n,
                        total_tokens=chunk.prompt_tokens + n,
                    )
                    yield event([], usage)
    except Exception as exc:  # the response has started: report in-band, then end the stream
        detail = {"error": {"message": str(exc), "type": type(exc).__name__}}
        yield f"data: {json.dumps(detail)}\n\n"
    yield "data: [DONE]\n\n"


class ModelNotServedError(SplitVlmError):
    """The request names a model this server does not serve (OpenAI answers 404)."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ModelNotServedError(
            f"model {requested[:120]!r} is not served here; this server serves {served!r}"
        )


def openai_error(exc: SplitVlmError) -> dict[str, Any]:
    """OpenAI's error body (`error.message`, shown by OpenAI clients), plus our `detail`."""
    return {
        "error": {"message": str(exc), "type": type(exc).__name__, "code": exc.http_status},
        "detail": str(exc),
    }
