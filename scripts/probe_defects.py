"""Re-run the outside probe of issue 12 against fresh loopback services and print what each
attack costs now (status, wall time, RSS growth of this process, which hosts both services).

    python scripts/probe_defects.py
"""

from __future__ import annotations

import resource
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import grpc
import httpx
import numpy as np
import zstandard
from PIL import Image

from rx_service.client import RxClient
from rx_service.server import start_rx
from shared.codecs import build_codec
from shared.config import RxSettings, TxSettings
from shared.errors import RemoteError
from shared.protocol import pb, pb_grpc
from shared.protocol.packet import crc32, packet_to_bytes
from shared.split import GenerationOptions
from tx_service.client import TxClient
from tx_service.server import start_tx


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, attack: Callable[[], str]) -> None:
    before, t0 = rss_mb(), time.perf_counter()
    outcome = attack()
    print(f"| {name} | {outcome} | {(time.perf_counter() - t0) * 1e3:.0f} ms | {rss_mb() - before:+.0f} MB |")


def grpc_status(call: Callable[[], object]) -> str:
    try:
        call()
        return "OK"
    except RemoteError as exc:
        return exc.grpc_code.name
    except grpc.RpcError as exc:
        return exc.code().name


def main() -> int:
    rx = start_rx(RxSettings(grpc_port=0, http_port=0))
    tx = start_tx(TxSettings(port=0, rx_address=rx.grpc_address), require_rx=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    good = tx.engine.encode(image, "int8")
    rxc = RxClient(rx.grpc_address, timeout_s=120)
    opts = GenerationOptions(max_new_tokens=4)

    def zeros_packet() -> tuple[pb.FeatureHeader, bytes]:
        h = pb.FeatureHeader()
        h.CopyFrom(good.header)
        dim = int(h.shape[1])
        payload = zstandard.ZstdCompressor().compress(bytes(65_536 * dim * 4))
        codec = build_codec("raw|zstd")
        h.codec_spec, h.codec_fingerprint = codec.spec, codec.fingerprint
        h.shape[:] = [65_536, dim]
        h.meta["tokens_per_image"].values[:] = [65_536]
        h.payload_size, h.payload_crc32 = len(payload), crc32(payload)
        return h, payload

    print("| attack | answer | time | RSS |\n|---|---|---|---|")
    h, p = zeros_packet()
    measure(
        f"{len(packet_to_bytes(h, p))}-byte raw|zstd packet declaring [65536, {h.shape[1]}]",
        lambda: grpc_status(lambda: rxc.generate(h, p, "What?", opts)),
    )
    measure(
        "8,000-character prompt (1,024-position model)",
        lambda: grpc_status(lambda: rxc.generate(good.header, good.payload, "describe it " * 666, opts)),
    )
    measure(
        "temperature=1e-45 (gRPC)",
        lambda: grpc_status(
            lambda: rxc.generate(
                good.header, good.payload, "What?", GenerationOptions(max_new_tokens=4, temperature=1e-45)
            )
        ),
    )
    packet = packet_to_bytes(good.header, good.payload)
    with httpx.Client(base_url=rx.http_url, timeout=60) as http:

        def post(**fields: str) -> str:
            data = {"prompt": "What?", "max_new_tokens": "4"} | fields
            return f"HTTP {http.post('/v1/generate', files={'packet': ('p', packet)}, data=data).status_code}"

        measure("HTTP seed=2^64", lambda: post(seed=str(2**64)))
        measure("HTTP request after that, same connection", lambda: post())
    with grpc.insecure_channel(rx.grpc_address) as channel:
        info = channel.unary_unary("/splitvlm.v1.RxService/Info")
        measure("undecodable Info request", lambda: grpc_status(lambda: info(b"\xff\xff\xff", timeout=10)))
    codec = build_codec("zstd:level=22")
    h2 = pb.FeatureHeader()
    h2.CopyFrom(good.header)
    h2.codec_spec, h2.codec_fingerprint = codec.spec, codec.fingerprint
    measure(
        "codec outside the allow-list (zstd:level=22)",
        lambda: grpc_status(lambda: rxc.generate(h2, good.payload, "What?", opts)),
    )
    h3 = pb.FeatureHeader()
    h3.CopyFrom(good.header)
    h3.codec_spec = "A" * 10_000
    measure(
        "10,000-character codec_spec",
        lambda: grpc_status(lambda: rxc.generate(h3, good.payload, "What?", opts)),
    )

    # Six idle Generate streams, then Info and a valid Generate.
    release = threading.Event()

    def idle() -> Iterator[pb.GenerateRequest]:
        yield pb.GenerateRequest(start=pb.GenerateStart(header=good.header, prompt="What?"))
        release.wait(60)

    with grpc.insecure_channel(rx.grpc_address) as channel:
        stub = pb_grpc.RxServiceStub(channel)
        threads = [
            threading.Thread(target=lambda: grpc_status(lambda: list(stub.Generate(idle(), timeout=60))))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        measure(
            "Info while 6 Generate streams idle",
            lambda: grpc_status(lambda: RxClient(rx.grpc_address, timeout_s=10).info()),
        )
        measure(
            "valid Generate while 6 streams idle",
            lambda: grpc_status(
                lambda: RxClient(rx.grpc_address, timeout_s=10).generate(
                    good.header, good.payload, "What?", opts
                )
            ),
        )
        release.set()
        for t in threads:
            t.join()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 7071, 7071, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64, 9))
        + chunk(b"IEND", b"")
    )
    with TxClient(tx.address, timeout_s=60) as client:
        measure(
            f"{len(bomb)}-byte PNG declaring 7071x7071 (Tx)",
            lambda: grpc_status(lambda: client.ask(bomb, "What?", max_new_tokens=2)),
        )
    tx.stop()
    rx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
