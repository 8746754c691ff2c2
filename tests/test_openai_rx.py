"""Stored features on the Rx: POST /v1/features, the Rx's OpenAI-compatible chat completions with
`splitvlm://` image references (official `openai` client), the gRPC Query RPC, and multi-question
reuse of the image prefix's KV cache. Lossless packets answer with the unsplit model's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from shared.errors import RemoteError
from shared.grpc_util import open_channel, relay_errors
from shared.protocol import pb, pb_grpc
from shared.protocol.packet import packet_to_bytes
from shared.split import GenerationOptions
from shared.split.reference import unsplit_generate

QUESTIONS = ["What is in the image?", "What color is the circle?", "Is there a square?", "Describe it."]
NEW_TOKENS = 10


def _messages(url: str, prompt: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


def _upload(rx: Any, packet: bytes) -> httpx.Response:
    return httpx.post(f"{rx.http_url}/v1/features", files={"packet": ("pkt.bin", packet)}, timeout=60)


@pytest.fixture(scope="module")
def lossless_packet(tx: Any, images: list) -> bytes:
    encoded = tx.engine.encode(images[2], "lossless")
    return packet_to_bytes(encoded.header, encoded.payload)


@pytest.fixture(scope="module")
def stored_id(rx: Any, lossless_packet: bytes) -> str:
    resp = _upload(rx, lossless_packet)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


@pytest.fixture(scope="module")
def client(rx: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=rx.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _query(rx: Any, prompt: str, **ref: str) -> list[pb.TextChunk]:
    channel = open_channel(rx.grpc_address)
    try:
        stub = pb_grpc.RxServiceStub(channel)
        request = pb.QueryRequest(
            prompt=prompt, options=pb.GenerationOptions(max_new_tokens=NEW_TOKENS), **ref
        )
        return list(relay_errors(stub.Query(request, timeout=60), "rx"))
    finally:
        channel.close()


def test_upload_is_idempotent_and_raw_bodies_work(rx: Any, lossless_packet: bytes, stored_id: str) -> None:
    raw = httpx.post(f"{rx.http_url}/v1/features", content=lossless_packet, timeout=60)
    assert raw.status_code == 200 and raw.json()["id"] == stored_id
    assert raw.json()["url"] == f"splitvlm://features/{stored_id}"


def test_chat_about_stored_features_matches_unsplit(
    client: openai.OpenAI, rx: Any, stored_id: str, model_dir: Path, images: list
) -> None:
    prompt = QUESTIONS[1]
    resp = client.chat.completions.create(
        model=rx.engine.model_id,
        messages=_messages(f"splitvlm://features/{stored_id}", prompt),  # type: ignore[arg-type]
        max_tokens=NEW_TOKENS,
    )
    expected = unsplit_generate(model_dir, [images[2]], prompt, GenerationOptions(max_new_tokens=NEW_TOKENS))
    extra = resp.model_extra or {}
    assert extra["splitvlm"]["token_ids"] == expected
    assert extra["splitvlm"]["feature_id"] == stored_id
    assert resp.choices[0].message.content == rx.engine.half.decode_tokens(expected)
    assert resp.usage is not None and resp.usage.completion_tokens == len(expected)
    streamed = list(
        client.chat.completions.create(
            model=rx.engine.model_id,
            messages=_messages(f"splitvlm://features/{stored_id}", prompt),  # type: ignore[arg-type]
            max_tokens=NEW_TOKENS,
            stream=True,
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == resp.choices[0].message.content
    )


def test_grpc_query_matches_grpc_generate(rx: Any, tx: Any, stored_id: str, images: list) -> None:
    chunks = _query(rx, QUESTIONS[0], feature_id=stored_id)
    assert chunks[-1].done and chunks[-1].feature_id == stored_id and chunks[-1].prompt_tokens > 0
    from rx_service.client import RxClient

    encoded = tx.engine.encode(images[2], "lossless")
    with RxClient(rx.grpc_address) as client:
        direct = client.generate(encoded.header, encoded.payload, QUESTIONS[0], GenerationOptions(NEW_TOKENS))
    assert [t for c in chunks for t in c.token_ids] == direct.token_ids


def test_unknown_ids_are_not_found(client: openai.OpenAI, rx: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=rx.engine.model_id,
            messages=_messages("splitvlm://features/" + "0" * 32, "hi"),  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=rx.engine.model_id,
            messages=_messages("splitvlm://streams/no-such-cam/latest", "hi"),  # type: ignore[arg-type]
        )
    with pytest.raises(RemoteError) as info:
        _query(rx, "hi", feature_id="f" * 32)
    assert info.value.grpc_code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RemoteError) as info:
        _query(rx, "hi", stream_id="ghost")
    assert info.value.grpc_code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("https://example.com/cat.png", "messages.0.content.0.image_url.url"),
        ("data:image/png;base64,AAAA", "not a stored-features reference"),
        ("splitvlm://streams/bad id!/latest", "stream id"),
    ],
)
def test_rx_chat_refuses_what_is_not_a_stored_reference(
    client: openai.OpenAI, rx: Any, url: str, needle: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=rx.engine.model_id, messages=_messages(url, "hi"))  # type: ignore[arg-type]
    assert needle in str(info.value.body)


def test_uploads_are_validated_like_generate(rx: Any, tx: Any, images: list) -> None:
    assert _upload(rx, b"garbage").status_code == 400
    encoded = tx.engine.encode(images[0], "int8")
    header = pb.FeatureHeader()
    header.CopyFrom(encoded.header)
    header.model_fingerprint = "sha256:" + "0" * 64
    resp = _upload(rx, packet_to_bytes(header, encoded.payload))
    assert resp.status_code == 409 and "model fingerprint mismatch" in resp.text
    corrupted = bytearray(encoded.payload)
    corrupted[len(corrupted) // 2] ^= 0xFF
    assert _upload(rx, packet_to_bytes(encoded.header, bytes(corrupted))).status_code == 422
    assert _upload(rx, packet_to_bytes(encoded.header, encoded.payload)).status_code == 200  # still serving


def test_prompt_over_the_context_is_400(client: openai.OpenAI, rx: Any, stored_id: str) -> None:
    long_prompt = "word " * 1600  # 8,000 characters, under max_prompt_chars, over tiny LLaVA's 1024 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=rx.engine.model_id,
            messages=_messages(f"splitvlm://features/{stored_id}", long_prompt),  # type: ignore[arg-type]
        )
    assert "context" in str(info.value.body)


def test_kv_prefix_reuse_gives_the_cold_answers(rx: Any, lossless_packet: bytes, stored_id: str) -> None:
    """Questions 2..N about one stored id reuse the image prefix's KV cache; answers equal cold runs."""
    from shared.protocol.packet import packet_from_bytes

    header, payload = packet_from_bytes(lossless_packet, rx.engine.settings.packet_limits())
    kv = rx.engine.kv_cache
    hits_before = kv.hits
    for question in QUESTIONS:
        cold = [
            t
            for c in rx.engine.generate(header, payload, question, GenerationOptions(NEW_TOKENS))
            for t in c.token_ids
        ]
        warm = [t for c in _query(rx, question, feature_id=stored_id) for t in c.token_ids]
        assert warm == cold, question
    assert kv.hits - hits_before >= len(QUESTIONS) - 1 and 0 < kv.nbytes <= kv.max_bytes


def test_models_and_streams_listing(client: openai.OpenAI, rx: Any) -> None:
    assert [m.id for m in client.models.list()] == [rx.engine.model_id]
    listing = httpx.get(f"{rx.http_url}/v1/streams", timeout=30).json()
    assert listing["backend"] == "memory" and isinstance(listing["streams"], list)
