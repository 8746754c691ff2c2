"""The Tx's OpenAI-compatible API with the official `openai` client, over real loopback servers.

Equivalence: with the lossless codec, a chat completion through the Tx gives the unsplit
model's tokens; `POST /v1/encode` makes a packet the Rx's /v1/generate answers the same way.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from shared.cli import app as cli_app
from shared.config import TxSettings
from shared.split import GenerationOptions
from shared.split.reference import unsplit_generate
from tx_service.server import start_tx

PROMPT = "What is in the image?"
NEW_TOKENS = 10


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(image)).decode()


def _messages(url: str, prompt: str = PROMPT) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge-images")


@pytest.fixture(scope="module")
def edge_tx(rx: Any, cache_dir: Path, image_root: Path) -> Iterator[Any]:
    """A Tx with its HTTP API on, sending lossless packets (for token equivalence)."""
    settings = TxSettings(
        port=0,
        http_enabled=True,
        http_port=0,
        http_file_roots=[image_root],
        codec="lossless",
        rx_address=rx.grpc_address,
        cache_dir=cache_dir,
    )
    running = start_tx(settings, require_rx=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(edge_tx: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=edge_tx.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_http_api_is_off_by_default() -> None:
    assert TxSettings().http_enabled is False


def test_models_lists_the_served_model(client: openai.OpenAI, edge_tx: Any) -> None:
    assert [m.id for m in client.models.list()] == [edge_tx.engine.model_id]


def test_chat_completion_matches_unsplit_model(
    client: openai.OpenAI, edge_tx: Any, rx: Any, model_dir: Path, images: list
) -> None:
    image = images[2]
    resp = client.chat.completions.create(
        model=edge_tx.engine.model_id,
        messages=_messages(_data_url(image)),
        max_tokens=NEW_TOKENS,  # type: ignore[arg-type]
    )
    expected = unsplit_generate(model_dir, [image], PROMPT, GenerationOptions(max_new_tokens=NEW_TOKENS))
    extra = resp.model_extra or {}
    assert extra["splitvlm"]["token_ids"] == expected
    assert resp.choices[0].message.content == rx.engine.half.decode_tokens(expected)
    assert resp.choices[0].finish_reason == ("length" if len(expected) == NEW_TOKENS else "stop")
    assert resp.usage is not None and resp.usage.completion_tokens == len(expected)
    # The prompt holds the template, the image's visual tokens and the question.
    tokens_per_image = edge_tx.engine.half.encode(edge_tx.engine.half.preprocess([image])).features.shape[0]
    assert resp.usage.prompt_tokens > tokens_per_image
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert extra["splitvlm"]["codec"].startswith("raw") and extra["splitvlm"]["payload_bytes"] > 0


def test_streamed_chat_equals_the_whole_answer(client: openai.OpenAI, edge_tx: Any, images: list) -> None:
    kwargs: dict[str, Any] = dict(
        model=edge_tx.engine.model_id, messages=_messages(_data_url(images[0])), max_tokens=NEW_TOKENS
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )  # type: ignore[union-attr]


def test_sse_wire_format_ends_with_done(edge_tx: Any, images: list) -> None:
    body = {
        "model": edge_tx.engine.model_id,
        "messages": _messages(_data_url(images[1])),
        "stream": True,
        "max_tokens": 3,
    }
    resp = httpx.post(f"{edge_tx.http_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [line for line in resp.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"chat.completion.chunk"' in events[0]


def test_file_url_under_an_allowed_folder(
    client: openai.OpenAI, edge_tx: Any, image_root: Path, images: list
) -> None:
    path = image_root / "shapes.png"
    path.write_bytes(_png(images[2]))
    by_file = client.chat.completions.create(
        model=edge_tx.engine.model_id,
        messages=_messages(path.as_uri()),
        max_tokens=NEW_TOKENS,  # type: ignore[arg-type]
    )
    by_data = client.chat.completions.create(
        model=edge_tx.engine.model_id,
        messages=_messages(_data_url(images[2])),
        max_tokens=NEW_TOKENS,  # type: ignore[arg-type]
    )
    assert (by_file.model_extra or {})["splitvlm"]["token_ids"] == (by_data.model_extra or {})["splitvlm"][
        "token_ids"
    ]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "robot", "content": "hi"}], "messages.0.role"),
        ([{"role": "user", "content": [{"type": "video", "url": "x"}]}], "messages.0.content"),
        ([{"role": "user", "content": "no picture here"}], "no image_url part"),
        (_messages("http://example.com/cat.png"), "remote image URLs are not fetched"),
        (_messages("file:///etc/hostname"), "outside the allowed folders"),
        (_messages("data:image/png;base64,@@@not-base64@@@"), "not valid base64"),
        (_messages("data:image/png;base64," + base64.b64encode(b"not an image").decode()), "image"),
        (_messages("data:image/png;base64,AAAA") + _messages("data:image/png;base64,AAAA"), "second image"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(
    client: openai.OpenAI, edge_tx: Any, messages: list, needle: str
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=edge_tx.engine.model_id, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert info.value.status_code in (400, 415), info.value
    assert needle in str(info.value.body), info.value.body


def test_unknown_model_is_404(client: openai.OpenAI, images: list) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=_messages(_data_url(images[0])))  # type: ignore[arg-type]


def test_encode_then_rx_generate_matches_the_chat_answer(
    client: openai.OpenAI, edge_tx: Any, rx: Any, images: list
) -> None:
    resp = httpx.post(
        f"{edge_tx.http_url}/v1/encode",
        files={"image": ("shapes.png", _png(images[2]))},
        data={"codec": "lossless"},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.headers["x-splitvlm-codec"].startswith("raw")
    answer = httpx.post(
        f"{rx.http_url}/v1/generate",
        files={"packet": ("pkt.bin", resp.content)},
        data={"prompt": PROMPT, "max_new_tokens": str(NEW_TOKENS)},
        timeout=60,
    ).json()
    chat = client.chat.completions.create(
        model=edge_tx.engine.model_id,
        messages=_messages(_data_url(images[2])),
        max_tokens=NEW_TOKENS,  # type: ignore[arg-type]
    )
    assert answer["token_ids"] == (chat.model_extra or {})["splitvlm"]["token_ids"]
    garbage = httpx.post(f"{edge_tx.http_url}/v1/encode", content=b"not an image", timeout=30)
    assert garbage.status_code == 415 and "not a decodable image" in garbage.text


def test_encode_cli_writes_a_packet_the_rx_answers(
    rx: Any, tmp_path: Path, images: list, cache_dir: Path
) -> None:
    src, out = tmp_path / "shapes.png", tmp_path / "pkt.bin"
    src.write_bytes(_png(images[2]))
    result = CliRunner().invoke(cli_app, ["encode", str(src), "--out", str(out), "--codec", "lossless"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.stat().st_size > 0
    resp = httpx.post(
        f"{rx.http_url}/v1/generate",
        files={"packet": ("pkt.bin", out.read_bytes())},
        data={"prompt": PROMPT, "max_new_tokens": "3"},
        timeout=60,
    )
    assert resp.status_code == 200 and len(resp.json()["token_ids"]) >= 1


def test_http_api_needs_the_tx_token_when_one_is_set(rx: Any, cache_dir: Path, images: list) -> None:
    """The OpenAI client's api_key is the bearer token: the Tx's own tokens guard its HTTP API."""
    settings = TxSettings(
        port=0,
        http_enabled=True,
        http_port=0,
        rx_address=rx.grpc_address,
        cache_dir=cache_dir,
        auth_token="edge-secret",
    )
    running = start_tx(settings, require_rx=True)
    try:
        base = running.http_url + "/v1"
        with (
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong,
            pytest.raises(openai.AuthenticationError),
        ):
            wrong.models.list()
        with openai.OpenAI(base_url=base, api_key="edge-secret", max_retries=0) as right:
            assert right.models.list().data
            reply = right.chat.completions.create(
                model=right.models.list().data[0].id,
                messages=_messages(_data_url(images[0])),  # type: ignore[arg-type]
                max_tokens=2,
            )
        assert reply.choices[0].message.content is not None
    finally:
        running.stop()
