"""Defects an outside probe found (issue 12), each refused with a precise client error.

Small packet / huge work, prompt past the context, NaN-making temperature, seed overflow,
undecodable messages, unexpected errors (INTERNAL with an id, keep-alive kept), codecs outside
the allow-list, unbounded strings, image bombs on the Tx.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import grpc
import httpx
import pytest
import zstandard

from rx_service.client import RxClient
from rx_service.engine import RxEngine
from shared.codecs import build_codec
from shared.config import RxSettings
from shared.errors import FingerprintMismatchError, ImageError, RemoteError
from shared.images import decode_image
from shared.protocol import pb
from shared.protocol.packet import crc32, packet_to_bytes
from shared.split import GenerationOptions
from tx_service.client import TxClient

PROMPT = "What is in the image?"


def _packet(tx: Any, image: Any, codec: str = "int8") -> tuple[pb.FeatureHeader, bytes]:
    encoded = tx.engine.encode(image, codec)
    header = pb.FeatureHeader()
    header.CopyFrom(encoded.header)
    return header, encoded.payload


def _zeros_packet(tx: Any, image: Any, tokens: int, spec: str = "raw|zstd") -> tuple[pb.FeatureHeader, bytes]:
    """The probe's packet: a few hundred bytes of zstd'd zeros declaring `tokens` visual tokens."""
    header, _ = _packet(tx, image)
    dim = int(header.shape[1])
    payload = zstandard.ZstdCompressor().compress(bytes(tokens * dim * 4))
    codec = build_codec(spec)
    header.codec_spec, header.codec_fingerprint = codec.spec, codec.fingerprint
    del header.shape[:]
    header.shape.extend([tokens, dim])
    header.meta["tokens_per_image"].values[:] = [tokens]
    header.payload_size, header.payload_crc32 = len(payload), crc32(payload)
    return header, payload


def _grpc_error(
    rx: Any, header: pb.FeatureHeader, payload: bytes, prompt: str = PROMPT, **opts: Any
) -> RemoteError:
    options = GenerationOptions(**({"max_new_tokens": 4} | opts))
    with RxClient(rx.grpc_address, timeout_s=60) as client, pytest.raises(RemoteError) as info:
        client.generate(header, payload, prompt, options)
    return info.value


def _post(rx: Any, packet: bytes, client: httpx.Client | None = None, **fields: Any) -> httpx.Response:
    data = {"prompt": PROMPT, "max_new_tokens": "4"} | {k: str(v) for k, v in fields.items()}
    post = client.post if client is not None else httpx.post
    return post(f"{rx.http_url}/v1/generate", files={"packet": ("p.bin", packet)}, data=data, timeout=60)


def _still_serves(rx: Any, tx: Any, image: Any) -> None:
    header, payload = _packet(tx, image)
    with RxClient(rx.grpc_address) as client:
        assert client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=2)).token_ids


# ---- (a) token counts tied to the model ------------------------------------------------------


def test_small_packet_declaring_65536_tokens_is_refused_before_work(rx: Any, tx: Any, images: list) -> None:
    header, payload = _zeros_packet(tx, images[0], 65_536)
    assert len(payload) < 4096  # a few hundred bytes buy nothing
    err = _grpc_error(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exactly 64 per image" in err.detail and "65536" in err.detail
    resp = _post(rx, packet_to_bytes(header, payload))
    assert resp.status_code == 400 and "exactly 64" in resp.json()["detail"]
    _still_serves(rx, tx, images[0])


def test_full_token_codec_must_carry_exactly_the_models_tokens(rx: Any, tx: Any, images: list) -> None:
    header, payload = _zeros_packet(tx, images[0], 63)  # one short
    err = _grpc_error(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "exactly 64" in err.detail


def test_token_reducing_codec_may_not_declare_more_than_the_model_makes(
    rx: Any, tx: Any, images: list
) -> None:
    header, payload = _zeros_packet(tx, images[0], 200, spec="prune:0.5|raw|zstd")
    err = _grpc_error(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "only ever sends fewer" in err.detail
    reduced, payload = _packet(tx, images[0], "prune:0.5|int8|zstd")  # 32 tokens: accepted
    with RxClient(rx.grpc_address) as client:
        assert client.generate(reduced, payload, PROMPT, GenerationOptions(max_new_tokens=2)).token_ids


def test_prompt_past_the_models_context_is_invalid_argument(rx: Any, tx: Any, images: list) -> None:
    header, payload = _packet(tx, images[0])
    long_prompt = " ".join(["describe the red circle"] * 350)[:8000]  # ~1,400 tokens > 1,024 positions
    err = _grpc_error(rx, header, payload, prompt=long_prompt)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context of 1024 positions" in err.detail
    resp = _post(rx, packet_to_bytes(header, payload), prompt=long_prompt)
    assert resp.status_code == 400 and "context of 1024" in resp.json()["detail"]
    # A prompt that fits, with max_new_tokens that would not: refused too.
    fits = " ".join(["describe the red circle"] * 150)  # ~600 tokens
    err = _grpc_error(rx, header, payload, prompt=fits, max_new_tokens=512)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens (512)" in err.detail
    _still_serves(rx, tx, images[0])


# ---- (c) options that used to crash the server ----------------------------------------------


def test_tiny_temperature_and_huge_seed_are_client_errors(rx: Any, tx: Any, images: list) -> None:
    header, payload = _packet(tx, images[1])
    err = _grpc_error(rx, header, payload, temperature=1e-45)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.detail
    packet = packet_to_bytes(header, payload)
    for fields, needle in [
        ({"temperature": "1e-45"}, "temperature"),
        ({"temperature": "nan"}, "temperature"),
        ({"seed": str(2**64)}, "seed"),
        ({"seed": "-1"}, "seed"),
        ({"top_k": str(10**12)}, "top_k"),
    ]:
        resp = _post(rx, packet, **fields)
        assert resp.status_code == 400, (fields, resp.text)
        assert needle in resp.json()["detail"]
    # Sampling at the smallest allowed temperature works, and the largest seed is accepted.
    resp = _post(rx, packet, temperature="0.001", seed=str(2**64 - 1))
    assert resp.status_code == 200 and resp.json()["token_ids"]


def test_undecodable_request_messages_are_invalid_argument(rx: Any, tx: Any, images: list) -> None:
    garbage = b"\xff\xff\xff\xff\x0f"
    with grpc.insecure_channel(rx.grpc_address) as channel:
        info = channel.unary_unary("/splitvlm.v1.RxService/Info")
        with pytest.raises(grpc.RpcError) as raised:
            info(garbage, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        generate = channel.stream_stream("/splitvlm.v1.RxService/Generate")
        with pytest.raises(grpc.RpcError) as raised:
            list(generate(iter([garbage]), timeout=10))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ask = channel.unary_stream("/splitvlm.v1.TxService/Ask")
    with grpc.insecure_channel(tx.address) as channel:
        ask = channel.unary_stream("/splitvlm.v1.TxService/Ask")
        with pytest.raises(grpc.RpcError) as raised:
            list(ask(garbage, timeout=10))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _still_serves(rx, tx, images[0])


def test_unexpected_errors_are_internal_with_an_id_and_keep_the_connection(
    rx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> pb.InfoResponse:
        raise RuntimeError("secret internal state /etc/passwd")

    with httpx.Client(base_url=rx.http_url, timeout=30) as http:
        assert http.get("/v1/info").status_code == 200
        monkeypatch.setattr(rx.engine, "info", broken)
        resp = http.get("/v1/info")
        assert resp.status_code == 500
        body = resp.json()
        assert "error id" in body["detail"] and "secret" not in resp.text and "RuntimeError" not in resp.text
        assert resp.headers.get("connection") != "close"
        with RxClient(rx.grpc_address) as client, pytest.raises(RemoteError) as info:
            client.info()
        assert info.value.grpc_code == grpc.StatusCode.INTERNAL
        assert "error id" in info.value.detail and "secret" not in info.value.detail
        monkeypatch.undo()
        # The same keep-alive client (same pooled connection) still works after the 500.
        assert http.get("/v1/info").json()["service"] == "rx"


# ---- (d) the accepted-codec list and string bounds -------------------------------------------


def _strict_engine(rx: Any, cache_dir: Any, codecs: list[str] | None = None) -> RxEngine:
    settings = RxSettings(cache_dir=cache_dir, **({"codecs": codecs} if codecs is not None else {}))
    base = rx.engine
    return RxEngine(settings=settings, half=base.half, model_id=base.model_id, fingerprint=base.fingerprint)


@pytest.mark.parametrize("spec", ["raw", "svd:r=4|fp16", "zstd:level=22", "linear:bits=5|zstd"])
def test_codecs_outside_the_allow_list_are_refused(
    spec: str, rx: Any, tx: Any, images: list, cache_dir: Any
) -> None:
    header, _ = _packet(tx, images[0], spec)
    engine = _strict_engine(rx, cache_dir)  # default allow-list: presets + the rate-control ladder
    with pytest.raises(FingerprintMismatchError, match="not accepted by this Rx"):
        engine.check_header(header)
    any_engine = _strict_engine(rx, cache_dir, ["any"])
    assert any_engine.check_header(header).spec == build_codec(spec).spec


def test_allow_list_is_enforced_over_the_wire(make_rx: Any, tx: Any, images: list) -> None:
    strict = make_rx(http=False, codecs=["int8"])
    header, payload = _packet(tx, images[0], "fp16")
    err = _grpc_error(strict, header, payload)
    assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION and "accepts int8" in err.detail.replace(
        "int8|zstd", "int8"
    )
    header, payload = _packet(tx, images[0], "int8")
    with RxClient(strict.grpc_address) as client:
        assert client.generate(header, payload, PROMPT, GenerationOptions(max_new_tokens=2)).token_ids
        assert "any" not in client.info().codecs


@pytest.mark.parametrize(
    "field, limit", [("codec_spec", 256), ("request_id", 128), ("model_fingerprint", 128)]
)
def test_huge_strings_are_refused_and_not_echoed(
    field: str, limit: int, rx: Any, tx: Any, images: list
) -> None:
    header, payload = _packet(tx, images[0])
    setattr(header, field, "A" * 10_000)
    err = _grpc_error(rx, header, payload)
    assert err.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field} has 10000 characters; at most {limit}" in err.detail
    assert len(err.detail) < 300 and "AAAA" not in err.detail
    resp = _post(rx, packet_to_bytes(header, payload))
    assert resp.status_code == 400 and len(resp.text) < 400


def test_unknown_form_field_name_is_not_echoed_at_length(rx: Any, tx: Any, images: list) -> None:
    header, payload = _packet(tx, images[0])
    resp = _post(rx, packet_to_bytes(header, payload), **{"x" * 5000: "1"})
    assert resp.status_code == 400 and len(resp.text) < 700


# ---- (e) image bombs on the Tx --------------------------------------------------------------


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_bomb_is_refused_from_its_header(tx: Any, images: list) -> None:
    bomb = _png_bomb(7071, 7071)
    assert len(bomb) < 128
    with pytest.raises(ImageError, match="7071x7071"):
        decode_image(bomb, max_bytes=2**20, max_pixels=tx.engine.settings.max_image_pixels)
    with TxClient(tx.address) as client:
        with pytest.raises(RemoteError) as info:
            client.ask(bomb, PROMPT)
        assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        assert "7071x7071" in info.value.detail and "max_image_pixels" in info.value.detail
        assert client.ask(images[0], PROMPT, max_new_tokens=2).token_ids


def test_tx_bounds_its_request_strings(tx: Any, images: list) -> None:
    with TxClient(tx.address) as client:
        for kwargs, needle in [
            ({"codec": "int8|" * 2000}, "codec has"),
            ({"request_id": "r" * 10_000}, "request_id"),
        ]:
            with pytest.raises(RemoteError) as info:
                client.ask(images[0], PROMPT, **kwargs)
            assert info.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.detail
            assert len(info.value.detail) < 300
