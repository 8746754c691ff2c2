"""The repository's contracts: generated code, compose file, README vs CI, the demo command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"


def test_generated_grpc_code_matches_proto() -> None:
    from shared.protocol.regen import drifted

    assert drifted() == [], "run `make proto` and commit shared/protocol/gen"


@pytest.mark.skipif(
    not COMPOSE_SCHEMA.is_file(), reason="../shared/schemas/compose-spec.json not beside the repo"
)
def test_docker_compose_validates_against_the_compose_spec() -> None:
    import json

    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    jsonschema.validate(compose, schema)
    assert {"rx", "tx"} <= set(compose["services"])
    assert compose["services"]["tx"]["environment"]["SPLITVLM_TX_RX_ADDRESS"].startswith("rx:")


def test_readme_quick_start_commands_are_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README needs a Quick start code block"
    commands = [c.strip() for c in block.group(1).splitlines() if c.strip() and not c.strip().startswith("#")]
    assert len(commands) == 2, commands
    assert "demo" in commands[0] and "test" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_cli_demo_runs_end_to_end(cache_dir: Path, model_dir: Path) -> None:
    env = {**os.environ, "SPLITVLM_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "demo", "--max-new-tokens", "6"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "answer:" in out and "bytes sent:" in out and "tx_vision_encoder" in out and "rx_prefill" in out
    # A held-out synthetic scene's question, answered by the shipped reference model (the
    # default), with its ground truth printed beside the answer.
    assert "builtin:reference-llava" in out and "random" not in out.lower()
    truth = re.search(r"ground truth: '([^']*)'\s+(correct|wrong)", out)
    assert truth, out
    assert truth.group(2) == "correct", out
