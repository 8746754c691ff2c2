"""The command line as a user meets it: one-line errors on stderr (exit 2), answers on stdout,
every setting's flag, variable and default visible, `ask --json`, `config show`, `health`."""

from __future__ import annotations

import io
import json
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.cli import PIPE_WIDTH, app, main, make_console
from shared.cli_settings import SETTING_FLAGS, SETTINGS, env_var

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["splitvlm", *argv]
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """A bad setting must fail before any model loads; `serve` must never get that far here."""
    import rx_service.engine
    import tx_service.engine

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rx_service.engine.RxEngine, "load", boom)
    monkeypatch.setattr(tx_service.engine.TxEngine, "load", boom)
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.mark.parametrize(
    "env, argv, names",
    [
        ({"SPLITVLM_RX_GRPC_PORT": "abc"}, ["rx", "serve"], ["SPLITVLM_RX_GRPC_PORT", "integer"]),
        ({}, ["rx", "serve", "--grpc-port", "99999"], ["--grpc-port 99999", "65535"]),
        ({}, ["rx", "serve", "--grpc-port", "abc"], ["--grpc-port", "integer"]),
        ({"SPLITVLM_RX_CODECS": "[int8"}, ["rx", "serve"], ["SPLITVLM_RX_CODECS", "a,b,c"]),
        ({"SPLITVLM_TX_LOG_LEVEL": "loud"}, ["tx", "serve"], ["SPLITVLM_TX_LOG_LEVEL", "'info'"]),
        ({"SPLITVLM_TX_METRICS_PORT": "-1"}, ["tx", "serve"], ["SPLITVLM_TX_METRICS_PORT", "--metrics-port"]),
        (
            {"SPLITVLM_RX_CODECS": "int8,nope"},
            ["rx", "serve"],
            ["SPLITVLM_RX_CODECS", "'nope'", "valid stages"],
        ),
        ({}, ["tx", "serve", "--codec", "linear:bits=99"], ["--codec", "bits must be"]),
        (
            {"SPLITVLM_RX_TLS_CERTFILE": "/certs/rx.pem"},  # a misspelt setting is never ignored
            ["rx", "serve"],
            ["unknown rx setting SPLITVLM_RX_TLS_CERTFILE"],
        ),
    ],
)
def test_invalid_settings_print_one_line_naming_the_setting_and_exit_2(
    env: dict[str, str],
    argv: list[str],
    names: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(name in lines[0] for name in names), lines[0]


def test_list_settings_take_comma_separated_values_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.config import RxSettings, TxSettings

    monkeypatch.setenv("SPLITVLM_RX_CODECS", "int8,fp16, linear:bits=4,granularity=token")
    monkeypatch.setenv("SPLITVLM_RX_CODEC_ARTIFACTS", "/a/pca16,/b/km4")
    monkeypatch.setenv("SPLITVLM_TX_CODEC_ARTIFACTS", '["/c/ae"]')  # a JSON list still works
    rx = RxSettings()
    assert rx.codecs == ["int8", "fp16", "linear:bits=4,granularity=token"]
    assert rx.codec_artifacts == [Path("/a/pca16"), Path("/b/km4")]
    assert TxSettings().codec_artifacts == [Path("/c/ae")]


@pytest.mark.parametrize(
    "argv, env_name",
    [
        (["rx", "serve", "--http-port", "0", "--grpc-port"], "SPLITVLM_RX_GRPC_PORT"),
        (["rx", "serve", "--grpc-port", "0", "--http-port"], "SPLITVLM_RX_HTTP_PORT"),
        (["tx", "serve", "--port", "0", "--metrics-port"], "SPLITVLM_TX_METRICS_PORT"),
        (["tx", "serve", "--metrics-port", "0", "--port"], "SPLITVLM_TX_PORT"),
    ],
)
def test_a_port_in_use_is_one_line_before_the_model_loads(
    argv: list[str], env_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, out, err = _run([*argv, str(port)], capsys)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert f"port {port}" in line and "in use" in line and env_name in line


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from shared import __version__

    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"splitvlm {__version__}"


@pytest.mark.parametrize("role", ["rx", "tx"])
def test_serve_help_shows_every_flag_with_its_default_and_variable(
    role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from shared.cli_settings import default_of

    code, out, _ = _run([role, "serve", "--help"], capsys)
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ --")}
    for name, flag in SETTING_FLAGS[role].items():
        line = next((v for k, v in rows.items() if k == flag or k.startswith(flag)), "")
        assert f"[default: ({default_of(role, name) or '(none)'}; env {env_var(role, name)})]" in line, (
            flag,
            line,
        )


def test_setting_flags_are_real_options_of_serve() -> None:
    import typer.main

    root: Any = typer.main.get_command(app)
    for role, flags in SETTING_FLAGS.items():
        serve = root.commands[role].commands["serve"]
        options = {opt for param in serve.params for opt in param.opts}
        assert set(flags.values()) <= options, set(flags.values()) - options
        assert set(flags) <= set(SETTINGS[role].model_fields)


def test_config_show_prints_every_setting_variable_default_and_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPLITVLM_RX_GRPC_PORT", "50123")
    code, out, _ = _run(["config", "show", "rx"], capsys)
    assert code == 0
    for name in SETTINGS["rx"].model_fields:
        assert name in out and env_var("rx", name) in out
    (row,) = [line for line in out.splitlines() if " grpc_port " in line]
    assert [c.strip() for c in row.strip("│ ").split("│")] == [
        "grpc_port",
        "SPLITVLM_RX_GRPC_PORT",
        "--grpc-port",
        "50061",
        "50123",
    ]


def test_readme_documents_every_setting_with_its_variable() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        env_var(role, n)
        for role, cls in SETTINGS.items()
        for n in cls.model_fields
        if env_var(role, n) not in readme
    ]
    assert not missing, missing


def test_ask_json_is_one_object_with_text_codec_bytes_timings_notice(
    tx: Any, images: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "scene.png"
    images[2].save(image)
    code, out, err = _run(
        ["ask", str(image), "What is it?", "--tx", tx.address, "--json", "--max-new-tokens", "3"], capsys
    )
    assert code == 0, err
    (line,) = out.strip().splitlines()
    answer = json.loads(line)
    assert {"text", "codec", "bytes", "timings_ms", "notice"} <= set(answer)
    assert answer["codec"].startswith("int8") and answer["bytes"]["payload"] > 0
    assert "tx_total" in answer["timings_ms"] and "random" in answer["notice"].lower()
    assert len(answer["token_ids"]) <= 3


def test_ask_streams_the_answer_to_stdout_and_the_rest_to_stderr(
    tx: Any, images: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tx_service.client import TxClient

    image = tmp_path / "scene.png"
    images[2].save(image)
    code, out, err = _run(["ask", str(image), "Where?", "--tx", tx.address, "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    with TxClient(tx.address) as client:
        expected = client.ask(image, "Where?", max_new_tokens=4).text
    assert out == expected + "\n"
    assert "note:" in err and "random" in err.lower() and "bytes sent: payload" in err


def test_health_probe(rx: Any, tx: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for role, address in (("rx", rx.grpc_address), ("tx", tx.address)):
        code, out, _ = _run(["health", role, "--address", address, "--timeout-s", "60"], capsys)
        assert code == 0 and out.startswith(f"{role} {address} ok:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    code, out, err = _run(["health", "rx", "--address", f"127.0.0.1:{dead}", "--timeout-s", "1"], capsys)
    assert code == 1 and out == "" and err.startswith("unhealthy:")


def test_raw_feature_bytes_are_before_token_reduction(tx: Any, images: list) -> None:
    """The demo's "N× smaller than the raw features" divides by these bytes."""
    from shared.models.tiny_llava import TOKENS_PER_IMAGE, VISION_HIDDEN
    from tx_service.client import TxClient

    with TxClient(tx.address) as client:
        for _ in range(2):  # encoded, then from the packet cache
            answer = client.ask(images[0], "What?", codec="pool:4|linear:bits=2|zstd", max_new_tokens=2)
            assert answer.feature_bytes == TOKENS_PER_IMAGE * VISION_HIDDEN * 4
    assert answer.cache_hit and answer.feature_bytes / answer.payload_bytes > 100


def test_calibration_artifact_files_get_one_mode(tmp_path: Path) -> None:
    from shared.codecs.calibration import CalibrationArtifact

    tensors, meta = CalibrationArtifact(spec="pca:k=2", tensors={"0.pca.w": torch.zeros(2, 2)}).save(
        tmp_path / "a"
    )
    assert stat.S_IMODE(tensors.stat().st_mode) == stat.S_IMODE(meta.stat().st_mode)


def test_piped_output_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    console = make_console()
    assert not console.is_terminal and console.width == PIPE_WIDTH
    console.print("word " * 60, markup=False)
    assert buffer.getvalue().count("\n") == 1


def test_health_auto_reads_the_role_from_the_container_command() -> None:
    from shared.cli import role_from_cmdline

    assert role_from_cmdline(b"/usr/local/bin/python3.11\0/usr/local/bin/splitvlm\0tx\0serve\0") == "tx"
    assert role_from_cmdline(b"splitvlm\0rx\0serve\0--grpc-port\0001\0") == "rx"
    assert role_from_cmdline(b"splitvlm\0demo\0") == ""
