"""`splitvlm demo`: Rx and Tx on loopback, one question, answer + bytes + timings."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from shared.config import RxSettings, TxSettings

DEFAULT_QUESTION = "What color is the circle?"


def demo_scene(size: int = 224) -> Image.Image:
    """A fixed little scene: a red circle and a blue square on a grey gradient."""
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        shade = 90 + y * 80 // size
        draw.line([(0, y), (size, y)], fill=(shade, shade, shade))
    s = size // 8
    draw.ellipse([s, s, 3 * s, 3 * s], fill=(220, 30, 30))
    draw.rectangle([5 * s, 4 * s, 7 * s, 6 * s], fill=(30, 60, 220))
    return img


def run_demo(
    console: Console,
    image_path: Path | None,
    question: str | None,
    model: str,
    codec: str,
    max_new_tokens: int,
) -> None:
    from rx_service.server import start_rx
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    image: Image.Image | Path = image_path if image_path is not None else demo_scene()
    question = question or DEFAULT_QUESTION
    t0 = time.perf_counter()
    with console.status(f"starting Rx ({model}) on loopback"):
        rx = start_rx(RxSettings(model=model, grpc_port=0, http_port=0))
    with console.status("starting Tx on loopback"):
        tx = start_tx(
            TxSettings(model=model, port=0, rx_address=rx.grpc_address, codec=codec), require_rx=True
        )
    console.print(
        f"Rx: gRPC {rx.grpc_address}, HTTP {rx.http_url} | Tx: gRPC {tx.address} "
        f"| model {model} | started in {time.perf_counter() - t0:.1f} s"
    )
    if rx.engine.notice:
        console.print(f"[bold yellow]note:[/] {rx.engine.notice}")
    try:
        with TxClient(tx.address) as client:
            t1 = time.perf_counter()
            answer = client.ask(image, question, codec=codec, max_new_tokens=max_new_tokens)
            elapsed = (time.perf_counter() - t1) * 1e3
    finally:
        tx.stop()
        rx.stop()
    raw = answer.feature_bytes
    console.print(f"[bold]image:[/] {image_path or 'generated demo scene'}")
    console.print(f"[bold]question:[/] {question}")
    console.print(f"[bold]answer:[/] {answer.text!r}  ({len(answer.token_ids)} tokens)")
    ratio = f", {raw / max(answer.payload_bytes, 1):.1f}x smaller than the raw features ({raw:,} B)"
    console.print(
        f"[bold]bytes sent:[/] payload {answer.payload_bytes:,} B, on the wire {answer.wire_bytes:,} B "
        f"(codec {answer.codec_spec}){ratio}"
    )
    table = Table(title="per-stage timings")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    for key, value in answer.timings_ms.items():
        table.add_row(key, f"{value:.1f}")
    table.add_row("end to end (client)", f"{elapsed:.1f}")
    console.print(table)
