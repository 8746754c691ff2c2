"""Fuzz the Rx with mutated packets and requests over gRPC and HTTP (issue 12).

    python scripts/fuzz_packets.py                 # 2,000 cases against a fresh loopback Rx
    python scripts/fuzz_packets.py --long          # >= 100,000 cases (tens of minutes on 2 cores)
    python scripts/fuzz_packets.py --cases 5000 --seed 7

Every case starts from a valid packet (an image through the Tx half and a random accepted
codec) and mutates it: header fields (shape, dtype, split point, codec spec and fingerprint,
metadata, sizes, CRC, version, strings up to 20,000 characters), payload bytes (flips,
truncation, extension, garbage), the serialized packet (HTTP), options (temperature incl.
NaN/inf/1e-45, top_p, top_k, seed, max_new_tokens), the prompt, the message sequence
(missing start, two starts, extra chunks) and raw undecodable messages. Pass criteria: no
INTERNAL/UNKNOWN over gRPC, no 5xx over HTTP, no hang (every call has a 60 s deadline and
DEADLINE_EXCEEDED counts as a hang), and a valid request is answered afterwards.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from shared.protocol import pb, pb_grpc
from shared.protocol.packet import crc32

SPECS = [
    "int8",
    "fp16",
    "lossless",
    "raw|zstd",
    "linear:bits=4|zstd",
    "linear:bits=2|zstd",
    "prune:0.5|int8|zstd",
    "pool:2|linear:bits=3|zstd",
    "tome:keep=0.5|int8|zstd",
    "mulaw:bits=4|zstd",
]
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 60.0


@dataclass
class Report:
    cases: int = 0
    grpc_codes: collections.Counter[str] = field(default_factory=collections.Counter)
    http_codes: collections.Counter[int] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        return not self.failures


def _rand_string(rng: random.Random) -> str:
    n = rng.choice([0, 1, 8, 64, 300, 5_000, 20_000])
    alphabet = "abc|:=,.-_ \x00\u00e9\u4e2d\U0001f600<image>"
    return "".join(rng.choice(alphabet) for _ in range(min(n, 300))) * max(1, n // 300)


def _rand_int(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, 2, 3, 31, 32, 63, 64, 65, 127, 1024, 65_536, 2**31 - 1, 2**40, 2**62, -1, -(2**40)]
    )


def mutate_header(
    rng: random.Random, header: pb.FeatureHeader, payload: bytes
) -> tuple[pb.FeatureHeader, bytes]:
    h = pb.FeatureHeader()
    h.CopyFrom(header)
    data = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        what = rng.randrange(14)
        if what == 0:
            del h.shape[:]
            h.shape.extend(_rand_int(rng) for _ in range(rng.choice([0, 1, 2, 2, 2, 3])))
        elif what == 1:
            h.dtype = rng.choice([0, 1, 2, 3, 4, 99])  # type: ignore[assignment]
        elif what == 2:
            h.split_point = rng.choice([0, 1, 2, 7])  # type: ignore[assignment]
        elif what == 3:
            from shared.codecs import build_codec

            spec = rng.choice(SPECS)
            codec = build_codec(spec)
            h.codec_spec, h.codec_fingerprint = codec.spec, codec.fingerprint
        elif what == 4:
            h.codec_spec = _rand_string(rng)
        elif what == 5:
            h.codec_fingerprint = rng.choice(["", "sha256:" + "0" * 64, _rand_string(rng)])
        elif what == 6:
            key = rng.choice(["tokens_per_image", "image_grid_thw", "image_rows", _rand_string(rng)[:100]])
            h.meta[key].values[:] = [_rand_int(rng) for _ in range(rng.choice([0, 1, 2, 3, 5000]))]
        elif what == 7:
            h.format_version = rng.choice([0, 2, 99, 2**32 - 1])
        elif what == 8:
            h.request_id = _rand_string(rng)
        elif what == 9:
            h.model_fingerprint = rng.choice(["", "sha256:feed", _rand_string(rng)])
        elif what == 10 and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif what == 11:
            data = data[: rng.randrange(len(data) + 1)]
        elif what == 12:
            data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 16, 1000])))
        else:
            data = bytearray(rng.randbytes(rng.choice([0, 1, 64, 4096])))
        if rng.random() < 0.7:  # usually keep size and CRC consistent, to get past them
            h.payload_size, h.payload_crc32 = len(data), crc32(bytes(data))
        elif rng.random() < 0.5:
            h.payload_size = _rand_int(rng) & (2**64 - 1)
    return h, bytes(data)


def mutate_options(rng: random.Random) -> pb.GenerationOptions:
    opts = pb.GenerationOptions(max_new_tokens=rng.choice([0, 1, 2, 2, 513, 2**32 - 1]))
    if rng.random() < 0.5:
        opts.temperature = rng.choice([0.0, 1e-45, 1e-4, 1e-3, 0.7, 10.0, 11.0, -1.0, math.inf, math.nan])
        opts.top_p = rng.choice([0.0, 1e-30, 0.5, 1.0, 1.5, math.nan])
        opts.top_k = rng.choice([0, 1, 50, 2**32 - 1])
        opts.seed = rng.choice([0, 1, 2**63, 2**64 - 1])
    return opts


def mutate_prompt(rng: random.Random) -> str:
    return rng.choice(["What is in the image?", "", "   ", "<image> what?", _rand_string(rng), "x " * 4000])


def grpc_requests(rng: random.Random, header: pb.FeatureHeader, payload: bytes) -> list[Any]:
    """A message sequence for Generate (GenerateRequest objects, or raw bytes)."""
    h, data = mutate_header(rng, header, payload) if rng.random() < 0.8 else (header, payload)
    start = pb.GenerateRequest(
        start=pb.GenerateStart(
            header=h,
            prompt=mutate_prompt(rng) if rng.random() < 0.3 else "What is it?",
            options=mutate_options(rng),
        )
    )
    chunks = [pb.GenerateRequest(payload_chunk=data[i : i + 1024]) for i in range(0, len(data), 1024)]
    messages: list[Any] = [start, *chunks]
    shape = rng.randrange(8)
    if shape == 0:
        messages = chunks  # no start
    elif shape == 1:
        messages = [start, start, *chunks]
    elif shape == 2:
        messages.append(pb.GenerateRequest(payload_chunk=b"\0" * rng.choice([1, 100_000])))
    elif shape == 3:
        messages = [m.SerializeToString() for m in messages]
        idx = rng.randrange(len(messages))
        raw = bytearray(messages[idx])
        for _ in range(rng.randint(1, 6)):
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        messages[idx] = bytes(raw)
    elif shape == 4:
        messages = [rng.randbytes(rng.choice([1, 5, 100]))]
    return messages


def http_case(rng: random.Random, header: pb.FeatureHeader, payload: bytes) -> tuple[bytes, dict[str, str]]:
    h, data = mutate_header(rng, header, payload) if rng.random() < 0.7 else (header, payload)
    packet = bytearray(pb.FeaturePacket(header=h, payload=data).SerializeToString())
    if rng.random() < 0.3:
        for _ in range(rng.randint(1, 10)):
            if packet:
                packet[rng.randrange(len(packet))] = rng.randrange(256)
    if rng.random() < 0.1:
        packet = packet[: rng.randrange(len(packet) + 1)]
    form = {"prompt": mutate_prompt(rng) if rng.random() < 0.3 else "What is it?", "max_new_tokens": "2"}
    if rng.random() < 0.4:
        form[rng.choice(["temperature", "top_p", "top_k", "seed", "max_new_tokens", "stream", "colour"])] = (
            rng.choice(["0", "1e-45", "nan", "inf", "-1", str(2**64), "abc", "", "0.5", "true", "9" * 400])
        )
    return bytes(packet), form


def run(
    grpc_address: str,
    http_url: str | None,
    header: pb.FeatureHeader,
    payload: bytes,
    cases: int,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
    metadata: list[tuple[str, str]] | None = None,
) -> Report:
    rng = random.Random(seed)
    report = Report()
    started = time.monotonic()
    identity = lambda b: b  # noqa: E731  # raw bytes pass through unserialized
    with grpc.insecure_channel(grpc_address) as channel, httpx.Client(timeout=CALL_TIMEOUT_S) as http:
        generate = channel.stream_stream(
            "/splitvlm.v1.RxService/Generate",
            request_serializer=identity,
            response_deserializer=pb.TextChunk.FromString,
        )
        for case in range(cases):
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                break
            use_http = http_url is not None and rng.random() < 0.35
            if use_http:
                packet, form = http_case(rng, header, payload)
                try:
                    resp = http.post(f"{http_url}/v1/generate", files={"packet": ("p", packet)}, data=form)
                    status = resp.status_code
                    if status >= 500:
                        report.failures.append(f"case {case}: HTTP {status}: {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    status = 0
                    report.failures.append(f"case {case}: HTTP transport error {type(exc).__name__}: {exc}")
                report.http_codes[status] += 1
            else:
                messages = [
                    m if isinstance(m, bytes) else m.SerializeToString()
                    for m in grpc_requests(rng, header, payload)
                ]
                try:
                    list(generate(iter(messages), timeout=CALL_TIMEOUT_S, metadata=metadata))
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code in BAD_GRPC:
                        report.failures.append(f"case {case}: gRPC {code.name}: {str(exc.details())[:200]}")
                report.grpc_codes[code.name] += 1
            report.cases += 1
            if progress is not None:
                progress(report.cases)
        # The server still answers a valid request.
        stub = pb_grpc.RxServiceStub(channel)
        start = pb.GenerateStart(
            header=header, prompt="What is it?", options=pb.GenerationOptions(max_new_tokens=2)
        )
        chunks = [pb.GenerateRequest(start=start), pb.GenerateRequest(payload_chunk=payload)]
        try:
            answer = list(stub.Generate(iter(chunks), timeout=CALL_TIMEOUT_S, metadata=metadata))
            if not answer or not answer[-1].done:
                report.failures.append("valid request after fuzzing: no complete answer")
        except grpc.RpcError as exc:
            report.failures.append(f"valid request after fuzzing failed: {exc.code().name}: {exc.details()}")
    report.seconds = time.monotonic() - started
    return report


def summary(report: Report) -> str:
    lines = [
        f"{report.cases} cases in {report.seconds:.1f} s ({report.cases / max(report.seconds, 1e-9):.1f}/s)",
        "gRPC: " + ", ".join(f"{k} {v}" for k, v in report.grpc_codes.most_common()),
        "HTTP: " + ", ".join(f"{k} {v}" for k, v in sorted(report.http_codes.items())),
        f"failures (INTERNAL/UNKNOWN/hang/5xx, or no answer afterwards): {len(report.failures)}",
        *report.failures[:20],
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--long", action="store_true", help="100,000 cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = 100_000 if args.long else args.cases

    import numpy as np
    from PIL import Image

    from rx_service.server import start_rx
    from shared.config import RxSettings, TxSettings
    from tx_service.engine import TxEngine

    rx = start_rx(RxSettings(grpc_port=0, http_port=0, codecs=["any"]))
    engine = TxEngine.load(TxSettings(rx_address=rx.grpc_address))
    image = Image.fromarray(np.random.default_rng(args.seed).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    encoded = engine.encode(image, "int8")
    last = [time.monotonic()]

    def progress(done: int) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"  {done}/{cases} cases", flush=True)

    try:
        report = run(
            rx.grpc_address, rx.http_url, encoded.header, encoded.payload, cases, args.seed, progress=progress
        )
    finally:
        rx.stop()
    print(summary(report))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
