"""The `splitvlm` command line.

splitvlm rx serve                       # Rx: gRPC :50061 + HTTP :8061
splitvlm tx serve --rx HOST:PORT        # Tx: gRPC :50051
splitvlm ask IMAGE "question"           # ask a running Tx
splitvlm demo                           # both services on loopback, one question, then exit
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared import __version__
from shared.config import DEFAULT_MODEL, RxSettings, TxSettings
from shared.errors import SplitVlmError
from shared.split.base import SplitPoint

app = typer.Typer(help="Split inference for vision-language models.", no_args_is_help=True)
rx_app = typer.Typer(help="The server side: connector + language model.", no_args_is_help=True)
tx_app = typer.Typer(help="The edge side: image processor + vision encoder + codec.", no_args_is_help=True)
app.add_typer(rx_app, name="rx")
app.add_typer(tx_app, name="tx")
console = Console()

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help=f"Hub id (from the local HF cache), local folder, or builtin:NAME [default: {DEFAULT_MODEL}]."
    ),
]
SplitOpt = Annotated[
    SplitPoint | None, typer.Option(help="Where the model is cut [default: after_vision_tower].")
]


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings(cls: type[Any], **overrides: Any) -> Any:
    """Build settings from env vars, with CLI flags that were given taking precedence."""
    return cls(**{k: v for k, v in overrides.items() if v is not None})


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    _setup_logging(log_level)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"splitvlm {__version__}")


@rx_app.command("serve")
def rx_serve(
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
    split: SplitOpt = None,
) -> None:
    """Serve the Rx (gRPC + HTTP) until interrupted."""
    from rx_service.server import start_rx

    settings = _settings(
        RxSettings, model=model, host=host, grpc_port=grpc_port, http_port=http_port, split_point=split
    )
    with console.status(f"loading {settings.model} (Rx half)"):
        running = _or_exit(lambda: start_rx(settings))
    console.print(f"Rx ready: gRPC {running.grpc_address}, HTTP {running.http_url}")
    _notice(running.engine.notice)
    _serve_forever(running)


@tx_app.command("serve")
def tx_serve(
    rx: Annotated[str | None, typer.Option(help="HOST:PORT of the Rx gRPC server.")] = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port.")] = None,
    codec: Annotated[str | None, typer.Option(help="Default codec preset or spec.")] = None,
    split: SplitOpt = None,
) -> None:
    """Serve the Tx until interrupted."""
    from tx_service.server import start_tx

    settings = _settings(
        TxSettings, rx_address=rx, model=model, host=host, port=port, codec=codec, split_point=split
    )
    with console.status(f"loading {settings.model} (Tx half)"):
        running = _or_exit(lambda: start_tx(settings))
    console.print(f"Tx ready on {running.address}, sending to Rx {settings.rx_address}")
    _serve_forever(running)


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="Image file.", exists=True, dir_okay=False)],
    question: Annotated[str, typer.Argument(help="Question about the image.")],
    tx: Annotated[str, typer.Option(help="HOST:PORT of the Tx.")] = "127.0.0.1:50051",
    codec: Annotated[str, typer.Option(help="Codec preset or spec (default: the Tx's).")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Ask a running Tx a question about an image; streams the answer."""
    from tx_service.client import TxClient

    def run() -> None:
        with TxClient(tx) as client:
            for chunk in client.ask_stream(image, question, codec=codec, max_new_tokens=max_new_tokens):
                console.print(chunk.text, end="", markup=False, highlight=False)
                if chunk.done:
                    console.print()
                    console.print(_bytes_line(chunk.payload_bytes, chunk.wire_bytes, chunk.codec_spec))

    _or_exit(run)


@app.command()
def demo(
    image: Annotated[Path | None, typer.Option(help="Image file (default: a generated scene).")] = None,
    question: Annotated[str | None, typer.Option(help="Question (default: one about the scene).")] = None,
    model: Annotated[
        str, typer.Option(help="Hub id (local HF cache), local folder or builtin:NAME.")
    ] = DEFAULT_MODEL,
    codec: Annotated[str, typer.Option(help="Codec preset or spec.")] = "int8",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 24,
) -> None:
    """Start Rx and Tx on loopback, ask one question about an image, print answer, bytes and timings."""
    from shared.demo import run_demo

    _or_exit(lambda: run_demo(console, image, question, model, codec, max_new_tokens))


def _bytes_line(payload: int, wire: int, codec: str) -> str:
    return f"bytes sent: payload {payload:,} B, on the wire {wire:,} B (codec {codec})"


def _notice(notice: str) -> None:
    if notice:
        console.print(f"[bold yellow]note:[/] {notice}")


def _or_exit(fn: Any) -> Any:
    try:
        return fn()
    except SplitVlmError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _serve_forever(running: Any) -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
        running.stop()


def timings_table(timings: dict[str, float]) -> Table:
    table = Table(title="per-stage timings (ms)")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    for key, value in timings.items():
        table.add_row(key, f"{value:.1f}")
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
