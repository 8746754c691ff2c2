"""The `splitvlm` command line.

splitvlm rx serve                       # Rx: gRPC :50061 + HTTP :8061
splitvlm tx serve --rx HOST:PORT        # Tx: gRPC :50051
splitvlm ask IMAGE "question"           # ask a running Tx
splitvlm demo                           # both services on loopback, one question, then exit
splitvlm calibrate --synthetic 32 --codec 'pca:k=16|int8|zstd' --out a   # fit a calibrated codec
splitvlm config show rx|tx              # every setting: env variable, flag, default, current value
splitvlm health rx|tx                   # probe a running service (container healthchecks)

Answers go to stdout, errors (one line, exit 2) and notes to stderr. Piped output is not
wrapped (see `make_console`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared import __version__
from shared.cli_settings import SETTING_FLAGS, build_settings, check_codecs, default_help, settings_rows
from shared.config import DEFAULT_MODEL
from shared.errors import SplitVlmError
from shared.logs import setup_logging
from shared.split.base import SplitPoint

try:  # typer >= 0.2x carries its own copy of click, whose exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

# Width for output that is not a terminal (pipes, logs): wide enough that tables are never cut.
PIPE_WIDTH = 240


def make_console(stderr: bool = False) -> Console:
    """A console that wraps nothing it prints, and renders tables for logs at a wide width when
    the output is not a terminal (COLUMNS still wins)."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return Console(stderr=stderr, soft_wrap=True)
    return Console(stderr=stderr, soft_wrap=True, width=PIPE_WIDTH)


app = typer.Typer(help="Split inference for vision-language models.", no_args_is_help=True)
rx_app = typer.Typer(help="The server side: connector + language model.", no_args_is_help=True)
tx_app = typer.Typer(help="The edge side: image processor + vision encoder + codec.", no_args_is_help=True)
config_app = typer.Typer(help="Service settings.", no_args_is_help=True)
app.add_typer(rx_app, name="rx")
app.add_typer(tx_app, name="tx")
app.add_typer(config_app, name="config")
console = make_console()
err_console = make_console(stderr=True)


class Role(str, Enum):
    rx = "rx"
    tx = "tx"


def _setting_opt(role: str, name: str, help: str) -> Any:
    """A serve flag for a setting: its name from SETTING_FLAGS, its default shown from the settings."""
    return typer.Option(SETTING_FLAGS[role][name], help=help, show_default=default_help(role, name))


MODEL_HELP = "Hub id (org/name, downloaded into HF_HOME), local folder, or builtin:NAME."
SPLIT_HELP = "Where the model is cut."
ARTIFACT_HELP = "Calibration artifact (from `splitvlm calibrate`) for a calibrated codec; repeatable."
LOG_LEVEL_HELP = "debug, info (one access line per request), warning, error."
LOG_JSON_HELP = "Log JSON lines instead of text."
ArtifactOpt = Annotated[list[Path] | None, typer.Option("--codec-artifact", help=ARTIFACT_HELP)]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"splitvlm {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    log_level: Annotated[
        str | None,
        typer.Option(
            help="debug, info, warning, error; for `rx serve` / `tx serve` use their --log-level.",
            show_default="warning",
        ),
    ] = None,
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    setup_logging(log_level or "warning")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"splitvlm {__version__}", markup=False, highlight=False)


@rx_app.command("serve")
def rx_serve(
    model: Annotated[str | None, _setting_opt("rx", "model", MODEL_HELP)] = None,
    host: Annotated[str | None, _setting_opt("rx", "host", "Bind address.")] = None,
    grpc_port: Annotated[int | None, _setting_opt("rx", "grpc_port", "gRPC port.")] = None,
    http_port: Annotated[
        int | None, _setting_opt("rx", "http_port", "HTTP port (API, /metrics, /docs).")
    ] = None,
    split: Annotated[SplitPoint | None, _setting_opt("rx", "split_point", SPLIT_HELP)] = None,
    codecs: Annotated[
        str | None, _setting_opt("rx", "codecs", "Codec presets or specs this Rx accepts, comma-separated.")
    ] = None,
    codec_artifact: Annotated[list[Path] | None, _setting_opt("rx", "codec_artifacts", ARTIFACT_HELP)] = None,
    fold_decoder: Annotated[
        bool | None,
        typer.Option(
            "--fold-decoder/--no-fold-decoder",
            help="Fold a linear codec decoder (pca, sparse) into the projector's first Linear "
            "(compressed-domain decoding).",
            show_default=default_help("rx", "fold_decoder"),
        ),
    ] = None,
    max_prompt_chars: Annotated[
        int | None, _setting_opt("rx", "max_prompt_chars", "Longest prompt accepted.")
    ] = None,
    grpc_workers: Annotated[int | None, _setting_opt("rx", "grpc_workers", "gRPC worker threads.")] = None,
    log_level: Annotated[str | None, _setting_opt("rx", "log_level", LOG_LEVEL_HELP)] = None,
    log_json: Annotated[
        bool | None,
        typer.Option("--log-json", help=LOG_JSON_HELP, show_default=default_help("rx", "log_json")),
    ] = None,
) -> None:
    """Serve the Rx (gRPC + HTTP) until interrupted."""
    from rx_service.server import start_rx
    from shared.config import split_codec_list

    settings: Any = _or_exit(
        lambda: build_settings(
            "rx",
            model=model,
            host=host,
            grpc_port=grpc_port,
            http_port=http_port,
            split_point=split,
            codecs=split_codec_list(codecs) if codecs is not None else None,
            codec_artifacts=codec_artifact or None,
            fold_decoder=fold_decoder,
            max_prompt_chars=max_prompt_chars,
            grpc_workers=grpc_workers,
            log_level=log_level,
            log_json=log_json,
        )
    )
    _or_exit(lambda: check_codecs("rx", settings))
    setup_logging(settings.log_level, settings.log_json)
    with err_console.status(f"loading {settings.model} (Rx half)"):
        running = _or_exit(lambda: start_rx(settings))
    err_console.print(
        f"Rx ready: gRPC {running.grpc_address}, HTTP {running.http_url} (/docs, /metrics)",
        markup=False,
        highlight=False,
    )
    _notice(running.engine.notice)
    _serve_forever(running)


@tx_app.command("serve")
def tx_serve(
    rx: Annotated[str | None, _setting_opt("tx", "rx_address", "HOST:PORT of the Rx gRPC server.")] = None,
    model: Annotated[str | None, _setting_opt("tx", "model", MODEL_HELP)] = None,
    host: Annotated[str | None, _setting_opt("tx", "host", "Bind address.")] = None,
    port: Annotated[int | None, _setting_opt("tx", "port", "gRPC port.")] = None,
    codec: Annotated[str | None, _setting_opt("tx", "codec", "Default codec preset or spec.")] = None,
    split: Annotated[SplitPoint | None, _setting_opt("tx", "split_point", SPLIT_HELP)] = None,
    codec_artifact: Annotated[list[Path] | None, _setting_opt("tx", "codec_artifacts", ARTIFACT_HELP)] = None,
    max_prompt_chars: Annotated[
        int | None, _setting_opt("tx", "max_prompt_chars", "Longest prompt accepted.")
    ] = None,
    rx_timeout_s: Annotated[
        float | None, _setting_opt("tx", "rx_timeout_s", "Deadline of one call to the Rx, seconds.")
    ] = None,
    grpc_workers: Annotated[int | None, _setting_opt("tx", "grpc_workers", "gRPC worker threads.")] = None,
    metrics_port: Annotated[
        int | None, _setting_opt("tx", "metrics_port", "HTTP port of Prometheus /metrics.")
    ] = None,
    log_level: Annotated[str | None, _setting_opt("tx", "log_level", LOG_LEVEL_HELP)] = None,
    log_json: Annotated[
        bool | None,
        typer.Option("--log-json", help=LOG_JSON_HELP, show_default=default_help("tx", "log_json")),
    ] = None,
) -> None:
    """Serve the Tx until interrupted."""
    from tx_service.server import start_tx

    settings: Any = _or_exit(
        lambda: build_settings(
            "tx",
            rx_address=rx,
            model=model,
            host=host,
            port=port,
            codec=codec,
            split_point=split,
            codec_artifacts=codec_artifact or None,
            max_prompt_chars=max_prompt_chars,
            rx_timeout_s=rx_timeout_s,
            grpc_workers=grpc_workers,
            metrics_port=metrics_port,
            log_level=log_level,
            log_json=log_json,
        )
    )
    _or_exit(lambda: check_codecs("tx", settings))
    setup_logging(settings.log_level, settings.log_json)
    with err_console.status(f"loading {settings.model} (Tx half)"):
        running = _or_exit(lambda: start_tx(settings))
    err_console.print(
        f"Tx ready on {running.address}, sending to Rx {settings.rx_address}; metrics {running.metrics_url}",
        markup=False,
        highlight=False,
    )
    _notice(running.engine.notice)
    _serve_forever(running)


@config_app.command("show")
def config_show(role: Annotated[Role, typer.Argument(help="rx or tx.")]) -> None:
    """Every setting of a service: env variable, serve flag, default, and the value it has here."""
    settings = _or_exit(lambda: build_settings(role.value))
    table = Table(title=f"splitvlm {role.value} settings (current: from the environment)")
    for col in ("setting", "env variable", "flag", "default", "current"):
        table.add_column(col, overflow="fold")
    for row in settings_rows(role.value, settings):
        table.add_row(*row)
    console.print(table)


@app.command()
def health(
    role: Annotated[
        str, typer.Argument(help="rx, tx, or auto (the service this container runs, from PID 1's command).")
    ] = "auto",
    address: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT of its gRPC server.", show_default="127.0.0.1 and the service's port setting"
        ),
    ] = None,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Give up after this long.")] = 5.0,
) -> None:
    """Probe a running Rx or Tx over gRPC (its Info call); exit 0 when it answers, 1 when not."""
    from shared.errors import SettingError

    def probe() -> str:
        which = _container_role() if role == "auto" else role
        if which not in ("rx", "tx"):
            raise SettingError(f"health: role must be rx, tx or auto, not {role!r}")
        target = address or _local_address(which)
        if which == "rx":
            from rx_service.client import RxClient

            with RxClient(target) as rx_client:
                info = rx_client.info(timeout_s=timeout_s)
        else:
            from tx_service.client import TxClient

            with TxClient(target, timeout_s=timeout_s) as tx_client:
                info = tx_client.info()
        return f"{which} {target} ok: {info.model_id} ({info.architecture}), splitvlm {info.version}"

    try:
        line = probe()
    except SplitVlmError as exc:
        err_console.print(f"unhealthy: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(line, markup=False, highlight=False)


def _container_role() -> str:
    """rx or tx from PID 1's command line (`splitvlm rx serve` / `splitvlm tx serve`)."""
    try:
        return role_from_cmdline(Path("/proc/1/cmdline").read_bytes())
    except OSError:
        return ""


def role_from_cmdline(raw: bytes) -> str:
    """rx or tx from a NUL-separated command line such as ``python splitvlm rx serve``; "" if neither."""
    words = [a.decode(errors="replace") for a in raw.split(b"\0")]
    for i, word in enumerate(words[:-1]):
        if word in ("rx", "tx") and words[i + 1] == "serve":
            return word
    return ""


def _local_address(role: str) -> str:
    """The service's own address as the settings here give it; a wildcard bind is probed on loopback."""
    settings: Any = build_settings(role)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::", "[::]") else settings.host
    return f"{host}:{settings.grpc_port if role == 'rx' else settings.port}"


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
    json_out: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object (text, codec, bytes, timings, notice) instead of streaming."
        ),
    ] = False,
) -> None:
    """Ask a running Tx a question about an image; streams the answer to stdout, details to stderr."""
    from tx_service.client import TxClient

    def run() -> None:
        with TxClient(tx) as client:
            notice = client.info().notice
            chunks = client.ask_stream(
                image,
                question,
                codec=codec,
                max_new_tokens=max_new_tokens,
                target_bytes=target_bytes,
                target_fidelity=target_fidelity,
            )
            if json_out:
                from shared.answer import Answer

                answer = Answer.from_chunks(chunks)
                print(json.dumps(ask_json(answer, notice)))
                return
            if notice:
                _notice(notice)
            for chunk in chunks:
                console.print(chunk.text, end="", markup=False, highlight=False)
                if chunk.done:
                    console.print()
                    err_console.print(
                        _bytes_line(chunk.payload_bytes, chunk.wire_bytes, chunk.codec_spec),
                        markup=False,
                        highlight=False,
                    )
                    if chunk.rate_control:
                        err_console.print(
                            f"rate control: {chunk.rate_control}", markup=False, highlight=False
                        )

    _or_exit(run)


def ask_json(answer: Any, notice: str) -> dict[str, Any]:
    """`ask --json`'s object."""
    return {
        "text": answer.text,
        "codec": answer.codec_spec,
        "bytes": {
            "payload": answer.payload_bytes,
            "wire": answer.wire_bytes,
            "raw_features": answer.feature_bytes,
        },
        "timings_ms": answer.timings_ms,
        "notice": notice,
        "token_ids": answer.token_ids,
        "request_id": answer.request_id,
        "cache_hit": answer.cache_hit,
        "rate_control": answer.rate_control,
    }


@app.command()
def demo(
    image: Annotated[Path | None, typer.Option(help="Image file (default: a generated scene).")] = None,
    question: Annotated[str | None, typer.Option(help="Question (default: one about the scene).")] = None,
    model: Annotated[
        str, typer.Option(help="Hub id (org/name), local folder or builtin:NAME.")
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
    out: Annotated[
        Path | None,
        typer.Option(
            help="Artifact path: writes OUT.safetensors and OUT.json [default: under the cache dir's "
            "codecs/ folder, where the services and eval find it without flags]."
        ),
    ] = None,
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

    from shared.codecs.artifacts import default_artifact_path
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
        target = out if out is not None else default_artifact_path(model, codec)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("vision encoder", total=len(pictures))
            artifact = calibrate(
                model,
                codec,
                target,
                images=pictures,
                advance=lambda: progress.advance(task),
                on_stage=lambda spec: progress.update(task, description=f"fitting {spec}"),
                source=source,
            )
        console.print(f"calibrated {artifact.spec} on {len(pictures)} images ({source})")
        tensor_path, json_path = CalibrationArtifact.paths(target)
        console.print(f"wrote {tensor_path} and {json_path}")
        console.print(f"artifact fingerprint {artifact.fingerprint}")

    _or_exit(run)


@app.command("calibrate-ladder")
def calibrate_ladder_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the measured ladder (JSON).")],
    model: Annotated[str, typer.Option(help="Model reference (see rx serve).")] = DEFAULT_MODEL,
    codec: Annotated[
        list[str] | None, typer.Option(help="A candidate codec, added to the default ladder; repeatable.")
    ] = None,
    default_ladder: Annotated[bool, typer.Option(help="Include rate control's default ladder.")] = True,
    images: Annotated[
        int, typer.Option(min=1, help="Held-out scenes to measure on (2 questions each).")
    ] = 100,
    split: Annotated[
        SplitPoint, typer.Option(help="Where the model is cut.")
    ] = SplitPoint.AFTER_VISION_TOWER,
    codec_artifact: ArtifactOpt = None,
) -> None:
    """Measure candidate codecs' payload and held-out accuracy on a model: a ladder for rate control."""
    from rich.progress import Progress

    from shared.codecs.artifacts import artifacts_for
    from shared.codecs.ladder import measure_ladder
    from shared.codecs.rate import DEFAULT_LADDER
    from shared.models.registry import model_fingerprint, resolve_model

    def run() -> None:
        folder = resolve_model(model)
        specs = [*(DEFAULT_LADDER if default_ladder else ()), *(codec or [])]
        with Progress(console=console, transient=True) as progress:
            measured = measure_ladder(
                folder,
                specs,
                images=images,
                artifacts=artifacts_for(model, folder, codec_artifact or []),
                split_point=split,
                model=model,
                model_fingerprint=model_fingerprint(folder),
                progress=progress,
                on_skip=lambda spec, why: console.print(f"skipped {spec}: {why}", markup=False),
            )
        for r in measured.ordered():
            console.print(
                f"{r.accuracy:7.1%} {r.mean_bytes:9,.0f} B  {r.spec}", markup=False, highlight=False
            )
        console.print(f"wrote {measured.save(out)}")

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
    ladder: Annotated[
        Path | None,
        typer.Option(
            help="Measured ladder (`splitvlm calibrate-ladder`): --target-bytes runs pick the most "
            "accurate of its codecs whose payload fits [default: the model's own, found beside its "
            "calibration artifacts, if any]."
        ),
    ] = None,
) -> None:
    """Exact-match accuracy on the held-out VQA set, unsplit and split through each codec."""
    import json

    from rich.progress import Progress

    from shared.codecs.artifacts import artifacts_for
    from shared.codecs.ladder import MeasuredLadder
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
        artifacts = artifacts_for(model, folder, codec_artifact or [])
        # The model's own measured ladder (found beside its artifacts) unless one is given.
        measured = MeasuredLadder.load(ladder, model_fingerprint(folder)) if ladder else artifacts.ladder()
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
                results.append(
                    evaluate_rate_controlled(
                        folder,
                        items,
                        RateTarget(budget),
                        split,
                        progress,
                        ladder=measured,
                        artifacts=artifacts,
                    )
                )
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
        err_console.print(f"note: {notice}", markup=False, highlight=False)


# Modules of the `research` extra and what needs them.
_RESEARCH_MODULES = {"skimage": "reference scenes", "matplotlib": "bench plots"}


def _or_exit(fn: Any) -> Any:
    """Run ``fn``; a refusal (SplitVlmError) becomes one line on stderr and exit status 2."""
    try:
        return fn()
    except SplitVlmError as exc:
        _error_line(str(exc))
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if root not in _RESEARCH_MODULES:
            raise
        _error_line(
            f"this command needs {root} ({_RESEARCH_MODULES[root]}): pip install 'splitvlm[research]'"
        )


def _error_line(message: str) -> None:
    err_console.print("error: " + " ".join(message.split()), markup=False, highlight=False)
    raise typer.Exit(2)


def _serve_forever(running: Any) -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping")
        running.stop()


def _split_codec_list(text: str) -> list[str]:
    from shared.config import split_codec_list

    return split_codec_list(text)


@app.command("bench")
def bench_cmd(
    model: Annotated[str, typer.Option(help="Model reference (see rx serve).")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output folder (bench.json, README.md, PNG plots).")] = Path(
        "docs/benchmarks/latest"
    ),
    codecs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated codec presets/specs.",
            show_default="lossless,fp16,int8,balanced,tiny and two mixes",
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
        typer.Option(min=0.001, help="Rate of the throttled link.", show_default="the lowest --bandwidths"),
    ] = None,
    image_folder: Annotated[
        Path | None,
        typer.Option(help="Folder of the --questions images.", show_default="its folder", file_okay=False),
    ] = None,
    questions: Annotated[
        Path | None,
        typer.Option(
            help='Your questions instead of the held-out scenes: JSON lines {"image", "question", "answer"}.'
        ),
    ] = None,
    codec_artifact: ArtifactOpt = None,
    target_bytes: Annotated[
        str, typer.Option(help="Rate control budgets to measure, bytes, comma-separated (e.g. 100,400,1600).")
    ] = "",
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
            budgets = [int(b) for b in target_bytes.split(",") if b.strip()]
            icodecs = (
                [parse_image_codec(c) for c in image_codecs.split(",") if c.strip()]
                if image_codecs
                else list(DEFAULT_IMAGE_CODECS)
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        if any(b <= 0 for b in budgets):
            raise typer.BadParameter("--target-bytes needs positive byte counts")
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
            target_bytes=budgets,
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


def _wide_help() -> None:
    """Piped `--help` at PIPE_WIDTH, so that no default or env variable name is cut off."""
    try:
        from typer import rich_utils
    except ImportError:  # pragma: no cover - typer without rich
        return
    if hasattr(rich_utils, "MAX_WIDTH") and not os.environ.get("TERMINAL_WIDTH"):
        rich_utils.MAX_WIDTH = PIPE_WIDTH


# ---- issue 13: packets for curl users, and push mode ----------------------------------------


@app.command("encode")
def encode_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Where to write the serialized FeaturePacket.")] = Path("pkt.bin"),
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    codec: Annotated[str | None, typer.Option(help="Codec preset or spec [default: the Tx's, int8].")] = None,
    split: Annotated[SplitPoint | None, typer.Option(help=SPLIT_HELP)] = None,
    codec_artifact: ArtifactOpt = None,
) -> None:
    """Encode an image into a FeaturePacket file (vision half only, no Rx needed), for
    `curl -F packet=@pkt.bin -F prompt=... http://RX:8061/v1/generate` or POST /v1/features."""
    from tx_service.engine import TxEngine
    from tx_service.openai_api import encode_image

    def run() -> None:
        settings: Any = build_settings(
            "tx", model=model, codec=codec, split_point=split, codec_artifacts=codec_artifact or None
        )
        with err_console.status(f"loading {settings.model} (Tx half)"):
            engine = TxEngine.load(settings)
        data, header = encode_image(engine, image.read_bytes(), codec or "")
        out.write_bytes(data)
        console.print(
            f"wrote {out}: {len(data):,} B packet, payload {header.payload_size:,} B "
            f"(codec {header.codec_spec})",
            markup=False,
            highlight=False,
        )

    _or_exit(run)


@tx_app.command("stream")
def tx_stream(
    source: Annotated[
        Path,
        typer.Option(
            help="Folder of images (name order), video file, /dev/videoN, or GIF/APNG/TIFF.", exists=True
        ),
    ],
    stream_id: Annotated[str, typer.Option(help="Stream id on the Rx, e.g. cam1.")],
    rx: Annotated[str | None, typer.Option(help="HOST:PORT of the Rx gRPC server.")] = None,
    fps: Annotated[
        float | None, typer.Option(min=0.01, help="Frame rate [default: as fast as encoding].")
    ] = None,
    window: Annotated[
        int | None, typer.Option(min=1, help="Frames sent and not yet acknowledged, at most [default: 4].")
    ] = None,
    loop: Annotated[bool, typer.Option(help="Start the source again when it ends (until Ctrl-C).")] = False,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    codec: Annotated[str | None, typer.Option(help="Codec preset or spec [default: int8].")] = None,
    split: Annotated[SplitPoint | None, typer.Option(help=SPLIT_HELP)] = None,
    codec_artifact: ArtifactOpt = None,
) -> None:
    """Push a stream of frames to the Rx (Publish): newest frame wins when the uplink is slow,
    drops are counted, and the stream reconnects with backoff when the Rx restarts."""
    import itertools

    from rx_service.store.base import check_stream_id
    from tx_service.engine import TxEngine
    from tx_service.streamer import FrameStreamer, frames_from

    def run() -> None:
        check_stream_id(stream_id)
        settings: Any = build_settings(
            "tx",
            rx_address=rx,
            model=model,
            codec=codec,
            split_point=split,
            codec_artifacts=codec_artifact or None,
        )
        with err_console.status(f"loading {settings.model} (Tx half)"):
            engine = TxEngine.load(settings)
        frames = (
            itertools.chain.from_iterable(frames_from(source) for _ in itertools.count())
            if loop
            else frames_from(source)
        )
        streamer = FrameStreamer(engine, stream_id, window=window, fps=fps)
        console.print(f"streaming {source} as {stream_id!r} to Rx {settings.rx_address}", markup=False)
        try:
            stats = streamer.run(frames)
        except KeyboardInterrupt:
            streamer.stop()
            stats = streamer.stats
        console.print(stats.line(), markup=False, highlight=False, soft_wrap=True)

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
    """Entry point: usage errors too are one line on stderr (exit 2), never a box or a traceback."""
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        _wide_help()
    no_args = getattr(click_exceptions, "NoArgsIsHelpError", ())
    try:
        code = app(standalone_mode=False)
    except no_args:
        code = 0  # typer printed the help
    except click_exceptions.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        err_console.print(
            "error: " + " ".join(exc.format_message().split()) + hint, markup=False, highlight=False
        )
        code = 2
    except typer.Abort:
        err_console.print("aborted", markup=False, highlight=False)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
