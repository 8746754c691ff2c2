"""End to end over real loopback sockets: Tx gRPC ─► Rx gRPC, and the Rx HTTP API."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch

from rx_service.client import RxClient, RxHttpClient
from shared.errors import FingerprintMismatchError, RemoteError
from shared.protocol import pb
from shared.protocol.packet import crc32, packet_to_bytes
from shared.split import GenerationOptions
from shared.split.reference import unsplit_generate
from tx_service.client import TxClient

PROMPTS = ["What is in the image?", "What color is the circle?", "Describe the picture in a few words."]
NEW_TOKENS = 12


def _options() -> GenerationOptions:
    return GenerationOptions(max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("case", range(3))
def test_lossless_split_over_grpc_matches_unsplit_generate(
    case: int, tx: Any, model_dir: Path, images: list
) -> None:
    image, prompt = images[case], PROMPTS[case]
    with TxClient(tx.address) as client:
        answer = client.ask(image, prompt, codec="lossless", max_new_tokens=NEW_TOKENS)
    expected = unsplit_generate(model_dir, [image], prompt, _options())
    assert len(expected) > 0
    assert answer.token_ids == expected
    assert answer.payload_bytes > 0 and answer.wire_bytes > answer.payload_bytes
    # The session's Tx may serve this image from its packet cache (another test asked first).
    tx_stages = set() if answer.cache_hit else {"tx_vision_encoder", "tx_codec_encode"}
    assert tx_stages | {"rx_codec_decode", "rx_prefill"} <= set(answer.timings_ms)


def test_streamed_text_equals_final_text(tx: Any, images: list) -> None:
    with TxClient(tx.address) as client:
        chunks = list(client.ask_stream(images[2], PROMPTS[0], codec="lossless", max_new_tokens=NEW_TOKENS))
        whole = client.ask(images[2], PROMPTS[0], codec="lossless", max_new_tokens=NEW_TOKENS)
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids


def test_int8_payload_is_under_30_percent_of_lossless(tx: Any, images: list) -> None:
    with TxClient(tx.address) as client:
        lossless = client.ask(images[0], PROMPTS[0], codec="lossless", max_new_tokens=2)
        int8 = client.ask(images[0], PROMPTS[0], codec="int8", max_new_tokens=2)
    assert int8.payload_bytes <= 0.30 * lossless.payload_bytes, (int8.payload_bytes, lossless.payload_bytes)


def test_int8_keeps_per_token_cosine_on_real_features(tx: Any, images: list) -> None:
    half, codec = tx.engine.half, tx.engine.codec("int8")
    for image in images:
        feats = half.encode(half.preprocess([image])).features
        decoded = codec.decode(codec.encode(feats), shape=tuple(feats.shape), dtype=feats.dtype)
        cos = torch.nn.functional.cosine_similarity(decoded.float(), feats.float(), dim=-1)
        assert float(cos.min()) >= 0.999


# ---- bad input on the Rx gRPC API -------------------------------------------------------


def _good_packet(tx: Any, image: Any, codec: str = "lossless") -> tuple[pb.FeatureHeader, bytes]:
    encoded = tx.engine.encode(image, codec)
    return encoded.header, encoded.payload


def _rx_call(rx: Any, header: pb.FeatureHeader, payload: bytes) -> RemoteError:
    with RxClient(rx.grpc_address) as client, pytest.raises(RemoteError) as info:
        client.generate(header, payload, PROMPTS[0], _options())
    return info.value


def _assert_rx_still_serves(rx: Any, tx: Any, image: Any) -> None:
    header, payload = _good_packet(tx, image)
    with RxClient(rx.grpc_address) as client:
        assert client.generate(header, payload, PROMPTS[0], GenerationOptions(max_new_tokens=3)).token_ids


def test_corrupted_checksum_is_data_loss(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2] ^= 0xFF
    err = _rx_call(rx, header, bytes(corrupted))
    assert err.grpc_code == grpc.StatusCode.DATA_LOSS and "checksum" in err.detail
    _assert_rx_still_serves(rx, tx, images[0])


def test_truncated_payload_is_invalid_argument(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    err = _rx_call(rx, header, payload[: len(payload) // 2])
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in err.detail
    _assert_rx_still_serves(rx, tx, images[0])


def test_unknown_format_version_is_unimplemented(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    header.format_version = 99
    err = _rx_call(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.UNIMPLEMENTED and "version 99" in err.detail
    _assert_rx_still_serves(rx, tx, images[0])


def test_wrong_model_fingerprint_is_failed_precondition(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    header.model_fingerprint = "sha256:" + "0" * 64
    err = _rx_call(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "sha256:" + "0" * 64 in err.detail and rx.engine.fingerprint in err.detail
    _assert_rx_still_serves(rx, tx, images[0])


def test_wrong_codec_fingerprint_is_failed_precondition(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0], "int8")
    header.codec_fingerprint = "sha256:" + "1" * 64
    err = _rx_call(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION and "codec fingerprint" in err.detail


def test_oversized_declaration_is_resource_exhausted(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    header.shape[0] = 10**9
    err = _rx_call(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_rx_still_serves(rx, tx, images[0])


def test_payload_that_does_not_decode_is_invalid_argument(rx: Any, tx: Any, images: list) -> None:
    header, _ = _good_packet(tx, images[0])
    garbage = bytes(range(256)) * 4
    header.payload_size, header.payload_crc32 = len(garbage), crc32(garbage)
    err = _rx_call(rx, header, garbage)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    _assert_rx_still_serves(rx, tx, images[0])


# ---- bad input on the Tx ----------------------------------------------------------------


@pytest.mark.parametrize(
    "upload, needle",
    [
        (b"this is not an image", "not a decodable image"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, ""),
    ],
)
def test_non_image_upload_is_invalid_argument(tx: Any, images: list, upload: bytes, needle: str) -> None:
    with TxClient(tx.address) as client:
        with pytest.raises(RemoteError) as info:
            client.ask(upload, PROMPTS[0])
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.detail
        assert client.ask(images[1], PROMPTS[0], max_new_tokens=2).token_ids


def test_unknown_codec_and_bad_options_are_invalid_argument(tx: Any, images: list) -> None:
    with TxClient(tx.address) as client:
        with pytest.raises(RemoteError) as info:
            client.ask(images[0], PROMPTS[0], codec="no-such-codec")
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RemoteError) as info:
            client.ask(images[0], PROMPTS[0], max_new_tokens=10**6)
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RemoteError) as info:
            client.ask(images[0], "   ")
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT


def test_tx_refuses_to_pair_with_an_rx_holding_another_model(
    rx: Any, tmp_path: Path, cache_dir: Path
) -> None:
    from shared.config import TxSettings
    from shared.models.tiny_llava import build_tiny_llava
    from tx_service.server import start_tx

    other = build_tiny_llava(tmp_path / "other-model", seed=1)
    with pytest.raises(FingerprintMismatchError) as info:
        start_tx(TxSettings(model=str(other), port=0, rx_address=rx.grpc_address, cache_dir=cache_dir))
    message = str(info.value)
    assert rx.engine.fingerprint in message and "this Tx holds" in message


# ---- Rx HTTP API ------------------------------------------------------------------------


def _post(rx: Any, packet: bytes, **fields: Any) -> httpx.Response:
    data = {"prompt": PROMPTS[0], "max_new_tokens": "4", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(
        f"{rx.http_url}/v1/generate", files={"packet": ("p.bin", packet)}, data=data, timeout=60
    )


def test_http_health_and_info(rx: Any) -> None:
    assert httpx.get(f"{rx.http_url}/healthz").json() == {"status": "ok"}
    info = httpx.get(f"{rx.http_url}/v1/info").json()
    assert info["model_fingerprint"] == rx.engine.fingerprint and info["service"] == "rx"
    assert "splitvlm_requests_total" in httpx.get(f"{rx.http_url}/metrics").text


def test_http_generate_json_matches_grpc(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[2])
    body = _post(rx, packet_to_bytes(header, payload)).json()
    with RxClient(rx.grpc_address) as client:
        via_grpc = client.generate(header, payload, PROMPTS[0], GenerationOptions(max_new_tokens=4))
    assert body["token_ids"] == via_grpc.token_ids and body["text"] == via_grpc.text
    assert body["payload_bytes"] == len(payload)
    assert (
        RxHttpClient(rx.http_url).generate(packet_to_bytes(header, payload), PROMPTS[0], max_new_tokens=4)[
            "token_ids"
        ]
        == via_grpc.token_ids
    )


def test_http_generate_sse_stream(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[2])
    resp = _post(rx, packet_to_bytes(header, payload), stream="true")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [block for block in resp.text.split("\n\n") if block.strip()]
    assert events[-1].startswith("event: done")
    tokens = [t for e in events for t in json.loads(e.split("data: ", 1)[1])["token_ids"]]
    assert tokens == _post(rx, packet_to_bytes(header, payload)).json()["token_ids"]


def test_http_bad_inputs_get_4xx_and_server_keeps_serving(rx: Any, tx: Any, images: list) -> None:
    header, payload = _good_packet(tx, images[0])
    good = packet_to_bytes(header, payload)

    png = io.BytesIO()
    images[0].save(png, format="PNG")
    resp = _post(rx, png.getvalue())  # an image is not a packet
    assert resp.status_code == 400 and "FeaturePacket" in resp.json()["detail"]

    corrupted = bytearray(payload)
    corrupted[-1] ^= 0x55
    assert _post(rx, packet_to_bytes(header, bytes(corrupted))).status_code == 422

    wrong_model = pb.FeatureHeader()
    wrong_model.CopyFrom(header)
    wrong_model.model_fingerprint = "sha256:feed"
    resp = _post(rx, packet_to_bytes(wrong_model, payload))
    assert resp.status_code == 409 and "sha256:feed" in resp.json()["detail"]

    old = pb.FeatureHeader()
    old.CopyFrom(header)
    old.format_version = 7
    assert _post(rx, packet_to_bytes(old, payload)).status_code == 422

    assert _post(rx, good[: len(good) - 10]).status_code in (400, 422)  # truncated file
    resp = _post(rx, good, colour="blue")  # unknown field
    assert resp.status_code == 400 and "colour" in resp.json()["detail"]
    assert _post(rx, good, max_new_tokens=0).status_code == 400
    resp = httpx.post(f"{rx.http_url}/v1/generate", data={"prompt": "hi"}, timeout=30)
    assert resp.status_code == 400 and "packet" in resp.json()["detail"]

    too_big = b"\0" * (rx.engine.settings.max_packet_bytes + 300 * 1024)
    assert _post(rx, too_big).status_code == 413

    resp = _post(rx, good)
    assert resp.status_code == 200 and resp.json()["token_ids"]


def test_lossless_split_after_projector_over_grpc_matches_unsplit(
    cache_dir: Path, model_dir: Path, images: list
) -> None:
    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from shared.split import SplitPoint
    from tx_service.server import start_tx

    split = SplitPoint.AFTER_PROJECTOR
    rx = start_rx(RxSettings(split_point=split, grpc_port=0, http_port=0, cache_dir=cache_dir), http=False)
    try:
        tx = start_tx(
            TxSettings(split_point=split, port=0, rx_address=rx.grpc_address, cache_dir=cache_dir),
            require_rx=True,
        )
        try:
            with TxClient(tx.address) as client:
                answer = client.ask(images[1], PROMPTS[1], codec="lossless", max_new_tokens=NEW_TOKENS)
        finally:
            tx.stop()
    finally:
        rx.stop()
    assert answer.token_ids == unsplit_generate(model_dir, [images[1]], PROMPTS[1], _options())
    # After the projector the features live in the LLM's width: 64 tokens x TEXT_HIDDEN fp32.
    from shared.models.tiny_llava import TEXT_HIDDEN, TOKENS_PER_IMAGE

    assert answer.feature_bytes == TOKENS_PER_IMAGE * TEXT_HIDDEN * 4


def test_tx_cache_serves_a_repeated_image_without_re_encoding(tx: Any, images: list) -> None:
    with TxClient(tx.address) as client:
        first = client.ask(images[2], PROMPTS[0], codec="fp16", max_new_tokens=4)
        hits = tx.engine.cache.hits
        again = client.ask(images[2], PROMPTS[1], codec="fp16", max_new_tokens=4)
    assert not first.cache_hit and again.cache_hit and tx.engine.cache.hits == hits + 1
    assert "tx_vision_encoder" not in again.timings_ms  # the encoder did not run
    assert again.payload_bytes == first.payload_bytes and again.request_id != first.request_id
