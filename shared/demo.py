"""`splitvlm demo`: Rx and Tx on loopback, one question, answer + bytes + timings."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from shared.config import RxSettings, TxSettings
from shared.errors import BadRequestError

DEMO_SEED = 10_000_000  # the first held-out scene: never seen in training


def demo_scene() -> tuple[Image.Image, str, str]:
    """A held-out synthetic scene, one of its questions, and the ground-truth answer."""
    from shared.reference.scenes import make_scene

    scene = make_scene(DEMO_SEED)
    qa = scene.qas[0]
    return scene.image, qa.question, qa.answer


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

    truth = ""
    if image_path is None:
        scene_image, scene_question, truth = demo_scene()
        image: Image.Image | Path = scene_image
        if question is None:
            question = scene_question
        else:
            truth = ""  # the user's own question about the scene: no ground truth
    else:
        image = image_path
    if question is None:
        raise BadRequestError("pass --question when you pass --image")
    t0 = time.perf_counter()
    with console.status(f"starting Rx ({model}) on loopback"):
        rx = start_rx(RxSettings(model=model, grpc_port=0, http_port=0))
    with console.status("starting Tx on loopback"):
        tx = start_tx(
            TxSettings(model=model, port=0, rx_address=rx.grpc_address, codec=codec),
            require_rx=True,
            metrics=False,
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
    console.print(f"[bold]image:[/] {image_path or f'held-out synthetic scene (seed {DEMO_SEED})'}")
    console.print(f"[bold]question:[/] {question}")
    console.print(f"[bold]answer:[/] {answer.text!r}  ({len(answer.token_ids)} tokens)")
    if truth:
        verdict = "[green]correct[/]" if answer.text.strip().lower() == truth else "[red]wrong[/]"
        console.print(f"[bold]ground truth:[/] {truth!r}  {verdict}")
    ratio = f", {raw / max(answer.payload_bytes, 1):.1f}x smaller than the raw features ({raw:,} B)"
    console.print(
        f"[bold]bytes sent:[/] payload {answer.payload_bytes:,} B, on the wire {answer.wire_bytes:,} B "
        f"(codec {answer.codec_spec}){ratio}"
    )
    console.print(timings_table({**answer.timings_ms, "end to end (client)": elapsed}))


# Pipeline order, Tx then Rx; anything else goes last.
STAGE_ORDER = (
    "tx_preprocess",
    "tx_vision_encoder",
    "tx_codec_encode",
    "tx_serialize",
    "rx_codec_decode",
    "rx_prefill",
    "rx_decode",
    "rx_per_token",
    "tx_total",
)


def timings_table(timings: dict[str, float]) -> Table:
    table = Table(title="per-stage timings")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    for key in sorted(timings, key=lambda k: rank.get(k, len(rank))):
        table.add_row(key, f"{timings[key]:.1f}")
    return table
