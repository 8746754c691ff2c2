"""The `splitvlm` command line.

splitvlm rx serve                       # Rx: gRPC :50061 + HTTP :8061
splitvlm tx serve --rx HOST:PORT        # Tx: gRPC :50051
splitvlm ask IMAGE "question"           # ask a running Tx
splitvlm demo                           # both services on loopback, one question, then exit
splitvlm calibrate --synthetic 32 --codec 'pca:k=16|int8|zstd' --out a   # fit a calibrated codec
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
ArtifactOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--codec-artifact",
        help="Calibration artifact (from `splitvlm calibrate`) for a calibrated codec; repeatable.",
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
    codec_artifact: ArtifactOpt = None,
    fold_decoder: Annotated[
        bool | None,
        typer.Option(
            help="Fold a linear codec decoder (pca, sparse) into the projector's first Linear "
            "(compressed-domain decoding) [default: on, or SPLITVLM_RX_FOLD_DECODER]."
        ),
    ] = None,
) -> None:
    """Serve the Rx (gRPC + HTTP) until interrupted."""
    from rx_service.server import start_rx

    settings = _settings(
        RxSettings,
        model=model,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        split_point=split,
        codec_artifacts=codec_artifact or None,
        fold_decoder=fold_decoder,
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
    codec_artifact: ArtifactOpt = None,
) -> None:
    """Serve the Tx until interrupted."""
    from tx_service.server import start_tx

    settings = _settings(
        TxSettings,
        rx_address=rx,
        model=model,
        host=host,
        port=port,
        codec=codec,
        split_point=split,
        codec_artifacts=codec_artifact or None,
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
    target_bytes: Annotated[
        int, typer.Option(min=0, help="Rate control: the Tx picks a codec whose payload is <= N bytes.")
    ] = 0,
    target_fidelity: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Rate control: the smallest payload keeping mean per-token cosine >= C."
        ),
    ] = 0.0,
) -> None:
    """Ask a running Tx a question about an image; streams the answer."""
    from tx_service.client import TxClient

    def run() -> None:
        with TxClient(tx) as client:
            chunks = client.ask_stream(
                image,
                question,
                codec=codec,
                max_new_tokens=max_new_tokens,
                target_bytes=target_bytes,
                target_fidelity=target_fidelity,
            )
            for chunk in chunks:
                console.print(chunk.text, end="", markup=False, highlight=False)
                if chunk.done:
                    console.print()
                    console.print(_bytes_line(chunk.payload_bytes, chunk.wire_bytes, chunk.codec_spec))
                    if chunk.rate_control:
                        console.print(f"rate control: {chunk.rate_control}", markup=False, highlight=False)

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


@app.command("train-reference")
def train_reference_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the checkpoint into.")] = Path(
        "shared/models/reference-llava"
    ),
    vision_steps: Annotated[
        int, typer.Option(min=0, help="Stage 1 steps: vision tower on per-patch targets.")
    ] = 2400,
    steps: Annotated[
        int, typer.Option(min=1, help="Stage 2 steps: projector + language model on answers.")
    ] = 3000,
    seed: Annotated[
        int, typer.Option(min=0, help="Model init seed; also picks the training scene seeds.")
    ] = 0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default).")] = 0,
    eval_images: Annotated[
        int, typer.Option(min=1, help="Held-out scenes to score (2 questions each).")
    ] = 300,
) -> None:
    """Train the reference VLM from scratch on synthetic scenes, score it, save it with a model card."""
    from shared.reference.build import train_reference
    from shared.reference.train import TrainConfig

    cfg = TrainConfig(vision_steps=vision_steps, steps=steps, seed=seed, threads=threads)
    result = train_reference(out, cfg, console, eval_images)
    console.print(f"saved {out}; held-out accuracy {result.accuracy:.1%}")
    for qtype, acc in result.per_type().items():
        console.print(f"  {qtype:<10} {acc:.1%}")


@app.command("calibrate")
def calibrate_cmd(
    codec: Annotated[str, typer.Option(help="Codec spec with calibrated stages, e.g. 'pca:k=16|int8|zstd'.")],
    out: Annotated[Path, typer.Option(help="Artifact path: writes OUT.safetensors and OUT.json.")],
    model: Annotated[str, typer.Option(help="Model reference (see rx serve).")] = DEFAULT_MODEL,
    images: Annotated[
        Path | None, typer.Option(help="Folder of calibration images.", exists=True, file_okay=False)
    ] = None,
    synthetic: Annotated[
        int | None, typer.Option(min=1, help="Use N synthetic training scenes instead of --images.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="First training-scene seed for --synthetic.")] = 0,
) -> None:
    """Fit a codec's calibrated stages (pca, kmeans, zstd:dict=1) on model features; save the artifact."""
    from rich.progress import Progress

    from shared.codecs.calibrate import calibrate, folder_images, synthetic_images
    from shared.codecs.calibration import CalibrationArtifact
    from shared.errors import CodecError

    def run() -> None:
        if (images is None) == (synthetic is None):
            raise CodecError("give exactly one of --images DIR or --synthetic N")
        if images is not None:
            pictures, source = folder_images(images), f"folder {images}"
        else:
            assert synthetic is not None
            pictures, source = (
                synthetic_images(synthetic, seed),
                f"synthetic scenes {seed}..{seed + synthetic - 1}",
            )
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("vision encoder", total=len(pictures))
            artifact = calibrate(
                model,
                codec,
                out,
                images=pictures,
                advance=lambda: progress.advance(task),
                on_stage=lambda spec: progress.update(task, description=f"fitting {spec}"),
                source=source,
            )
        console.print(f"calibrated {artifact.spec} on {len(pictures)} images ({source})")
        tensor_path, json_path = CalibrationArtifact.paths(out)
        console.print(f"wrote {tensor_path} and {json_path}")
        console.print(f"artifact fingerprint {artifact.fingerprint}")

    _or_exit(run)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Model reference (see rx serve).")] = DEFAULT_MODEL,
    codec: Annotated[
        list[str] | None, typer.Option(help="Codec preset or spec for split inference; repeatable.")
    ] = None,
    split: Annotated[
        SplitPoint, typer.Option(help="Where the model is cut.")
    ] = SplitPoint.AFTER_VISION_TOWER,
    images: Annotated[int, typer.Option(min=1, help="Held-out scenes (2 questions each).")] = 300,
    unsplit: Annotated[bool, typer.Option(help="Also score the unsplit model.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    target_bytes: Annotated[
        list[int] | None,
        typer.Option(
            min=1, help="Also split with rate control (a codec per image, payload <= N B); repeatable."
        ),
    ] = None,
    codec_artifact: ArtifactOpt = None,
    fold_decoder: Annotated[
        bool,
        typer.Option(
            help="Split runs fold a linear codec decoder (pca, sparse) into the projector's first "
            "Linear, as the Rx does; compare with --no-fold-decoder."
        ),
    ] = False,
) -> None:
    """Exact-match accuracy on the held-out VQA set, unsplit and split through each codec."""
    import json

    from rich.progress import Progress

    from shared.codecs.calibrate import load_artifacts
    from shared.codecs.rate import RateTarget
    from shared.models.registry import model_fingerprint, resolve_model
    from shared.reference.evaluate import (
        evaluate_rate_controlled,
        evaluate_split,
        evaluate_unsplit,
        heldout_items,
    )

    def run() -> None:
        folder = resolve_model(model)
        artifacts = load_artifacts(codec_artifact or [], model_fingerprint(folder))
        items = heldout_items(images)
        results = []
        with Progress(console=console, transient=True) as progress:
            if unsplit:
                results.append(evaluate_unsplit(folder, items, progress))
            for spec in codec or []:
                results.append(
                    evaluate_split(
                        folder, items, spec, split, progress, fold_decoder=fold_decoder, artifacts=artifacts
                    )
                )
            for budget in target_bytes or []:
                results.append(evaluate_rate_controlled(folder, items, RateTarget(budget), split, progress))
        console.print(eval_table(results))
        for r in results:
            if r.budget_bytes:
                chosen = ", ".join(f"{spec} x{n}" for spec, n in r.spec_counts().items())
                console.print(
                    f"{r.name}: {r.within_budget:.1%} of {len(r.payload_bytes)} packets <= "
                    f"{r.budget_bytes:,} B (max {max(r.payload_bytes):,} B); chosen: {chosen}",
                    markup=False,
                    highlight=False,
                )
        if json_out:
            json_out.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")

    _or_exit(run)


def eval_table(results: list[Any]) -> Table:
    from shared.reference.scenes import QTYPES

    table = Table(title="held-out VQA, exact match")
    for col in ["run", "n", "accuracy", *QTYPES, "payload B", "÷ fp16 B", "agree"]:
        table.add_column(col, justify="left" if col == "run" else "right")
    baseline = results[0] if results and results[0].name == "unsplit" else None
    for r in results:
        per = r.per_type()
        fp16 = r.feature_bytes // 2 if r.feature_bytes else 0
        payload = r.mean_payload_bytes
        table.add_row(
            r.name,
            str(len(r.expected)),
            f"{r.accuracy:.1%}",
            *(f"{per[q]:.1%}" if q in per else "-" for q in QTYPES),
            f"{payload:,.0f}" if payload else "-",
            f"{payload / fp16:.3f}" if payload and fp16 else "-",
            f"{r.agreement(baseline):.1%}" if baseline is not None and r is not baseline else "-",
        )
    return table


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


def _split_codec_list(text: str) -> list[str]:
    """Comma-separated codec specs; a piece like ``granularity=token`` continues the previous spec."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if specs and "=" in piece.split("|")[0] and ":" not in piece.split("|")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


@app.command("bench")
def bench_cmd(
    model: Annotated[str, typer.Option(help="Model reference (see rx serve).")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder (bench.json, README.md, PNG plots).")] = Path(
        "docs/benchmarks/latest"
    ),
    codecs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated codec presets/specs [default: lossless,fp16,int8,balanced,tiny,...]."
        ),
    ] = None,
    image_codecs: Annotated[
        str | None, typer.Option(help="Comma-separated image codecs for cloud-only: jpeg:Q, webp:Q, png.")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Held-out scenes (2 questions each).")] = 300,
    quick: Annotated[bool, typer.Option(help="Smoke test: 3 scenes, 3 throttled requests.")] = False,
    bandwidths: Annotated[str, typer.Option(help="Uplink rates to model, Mbit/s, comma-separated.")] = (
        "0.5,2,10,100"
    ),
    rtt_ms: Annotated[float, typer.Option(min=0.0, help="Round-trip time of the modelled link.")] = 40.0,
    threads: Annotated[
        int, typer.Option(min=0, help="torch threads (0: torch's default); throughput is per thread.")
    ] = 1,
    split: Annotated[
        SplitPoint, typer.Option(help="Where the model is cut.")
    ] = SplitPoint.AFTER_VISION_TOWER,
    validate: Annotated[
        bool, typer.Option(help="Check the latency model with real transfers through a throttled link.")
    ] = True,
    validate_mbps: Annotated[
        float | None,
        typer.Option(min=0.001, help="Rate of the throttled link [default: the lowest --bandwidths]."),
    ] = None,
    image_folder: Annotated[
        Path | None,
        typer.Option(help="Folder of the --questions images [default: its folder].", file_okay=False),
    ] = None,
    questions: Annotated[
        Path | None,
        typer.Option(
            help='Your questions instead of the held-out scenes: JSON lines {"image", "question", "answer"}.'
        ),
    ] = None,
    codec_artifact: ArtifactOpt = None,
) -> None:
    """Split inference vs sending the image: bytes, accuracy, timings and latency, measured in one run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from shared.bench import BenchConfig, run_bench
    from shared.bench.baselines import DEFAULT_IMAGE_CODECS, parse_image_codec
    from shared.bench.report import HEADLINE_COLUMNS, findings_lines, headline_rows, write_report
    from shared.bench.run import DEFAULT_CODECS

    def run() -> None:
        try:
            rates = [float(b) for b in bandwidths.split(",") if b.strip()]
            icodecs = (
                [parse_image_codec(c) for c in image_codecs.split(",") if c.strip()]
                if image_codecs
                else list(DEFAULT_IMAGE_CODECS)
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if not rates or any(r <= 0 for r in rates):
            raise typer.BadParameter("--bandwidths needs positive Mbit/s values")
        config = BenchConfig(
            model=model,
            codecs=_split_codec_list(codecs) if codecs else list(DEFAULT_CODECS),
            image_codecs=icodecs,
            images=3 if quick else images,
            bandwidths=rates,
            rtt_ms=rtt_ms,
            threads=threads,
            split=split,
            validate=validate,
            validate_mbps=validate_mbps,
            validate_requests=3 if quick else 0,
            image_folder=image_folder,
            questions=questions,
            codec_artifacts=list(codec_artifact or []),
        )
        columns = (
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("loading the model", total=None)

            def on_progress(what: str, done: int, total: int) -> None:
                progress.update(task, description=what, completed=done, total=total)

            results = run_bench(config, on_progress)
        paths = write_report(results, out)
        table = Table(title=f"splitvlm bench: {model} ({results['meta']['n_questions']} questions)")
        for col in HEADLINE_COLUMNS:
            table.add_column(col, justify="left" if col == "path" else "right")
        for row in headline_rows(results):
            table.add_row(*row)
        console.print(table)
        for spec, reason in results["skipped_codecs"].items():
            console.print(f"skipped {spec}: {reason}", markup=False, highlight=False)
        for line in findings_lines(results):
            console.print(line, markup=False, highlight=False)
        console.print(f"wrote {', '.join(str(p) for p in paths)}")

    _or_exit(run)


@app.command("certs")
def certs_cmd(
    out: Annotated[Path, typer.Option(help="Folder for ca.pem, rx.pem/key, tx.pem/key, client.pem/key.")],
    host: Annotated[
        list[str] | None, typer.Option(help="Extra DNS name or IP in the server certificates; repeatable.")
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
) -> None:
    """Make a development CA and TLS certificates for the Rx, the Tx and a client (mTLS)."""
    from shared.certs import make_dev_certs

    files = make_dev_certs(out, host or [], days)
    lines = [
        f"wrote {', '.join(p.name for p in files)} to {out}",
        f"Rx: SPLITVLM_RX_TLS_CERT={out}/rx.pem SPLITVLM_RX_TLS_KEY={out}/rx.key",
        f"    (mTLS: SPLITVLM_RX_TLS_CLIENT_CA={out}/ca.pem)",
        f"Tx: SPLITVLM_TX_TLS_CA={out}/ca.pem SPLITVLM_TX_TLS_CERT={out}/tx.pem",
        f"    SPLITVLM_TX_TLS_KEY={out}/tx.key",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
