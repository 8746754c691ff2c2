"""The deployment files: compose (v1 and v2), the override files, the image and its build context."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.model.yml", "docker-compose.tls.yml"]
ALL_COMPOSE_FILES = [*COMPOSE_FILES, "docker-compose.hub.yml"]


def _compose(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.skipif(not COMPOSE_SCHEMA.is_file(), reason="../shared/schemas/compose-spec.json missing")
@pytest.mark.parametrize("name", ALL_COMPOSE_FILES)
def test_compose_files_validate_against_the_compose_spec(name: str) -> None:
    import jsonschema

    jsonschema.validate(_compose(name), json.loads(COMPOSE_SCHEMA.read_text()))


def test_compose_file_has_nothing_compose_v1_refuses() -> None:
    compose = _compose("docker-compose.yml")
    # v1 (1.29) refuses a top-level `name:`; `version:` is obsolete in v2.
    assert set(compose) <= {"services", "volumes", "networks", "x-image"}, set(compose)


def _docker_compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(
                "docker-compose is not installed: .ci/run installs it (apt-get install docker-compose)"
            )
        pytest.skip("docker-compose (v1) not installed: apt-get install docker-compose")
    return binary


def test_docker_compose_v1_config_accepts_the_files() -> None:
    binary = _docker_compose()
    env = {**os.environ, "SPLITVLM_MODEL_DIR": "/srv/ckpt/llava", "SPLITVLM_CERTS_DIR": "/etc/certs"}
    base = subprocess.run(
        [binary, "-f", "docker-compose.yml", "config"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert base.returncode == 0, base.stderr
    args = [binary]
    for name in COMPOSE_FILES:
        args += ["-f", name]
    merged = subprocess.run([*args, "config"], cwd=REPO, capture_output=True, text=True, env=env)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    for role in ("rx", "tx"):
        svc = services[role]
        assert "/srv/ckpt/llava:/models/model:ro" in svc["volumes"]
        assert "/etc/certs:/certs:ro" in svc["volumes"]
        assert svc["environment"][f"SPLITVLM_{role.upper()}_MODEL"] == "/models/model"
    assert services["rx"]["environment"]["SPLITVLM_RX_TLS_CERT"] == "/certs/rx.pem"
    assert services["tx"]["environment"]["SPLITVLM_TX_TLS_CA"] == "/certs/ca.pem"

    hub = [binary, "-f", "docker-compose.yml", "-f", "docker-compose.hub.yml", "config"]
    missing = subprocess.run(hub, cwd=REPO, capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "SPLITVLM_HUB_MODEL" in missing.stderr  # says what to set
    env["SPLITVLM_HUB_MODEL"] = "llava-hf/llava-1.5-7b-hf"
    merged = subprocess.run(hub, cwd=REPO, capture_output=True, text=True, env=env)
    assert merged.returncode == 0, merged.stderr
    for role, svc in yaml.safe_load(merged.stdout)["services"].items():
        assert svc["environment"][f"SPLITVLM_{role.upper()}_MODEL"] == "llava-hf/llava-1.5-7b-hf"
        assert svc["environment"]["HF_HUB_OFFLINE"] == "0"
        assert svc["environment"]["HF_HOME"].startswith("/cache/")


def test_both_services_share_one_image_have_healthchecks_and_restart() -> None:
    services = _compose("docker-compose.yml")["services"]
    assert [name for name, svc in services.items() if "build" in svc] == ["rx"]
    assert services["rx"]["image"] == services["tx"]["image"]
    assert services["tx"]["depends_on"]["rx"]["condition"] == "service_healthy"
    for role, svc in services.items():
        assert svc["healthcheck"]["test"] == ["CMD", "splitvlm", "health", role]
        assert svc["restart"] in ("unless-stopped", "always", "on-failure")
        assert svc["environment"]["HF_HOME"].startswith("/cache/")
        assert "model-cache:/cache" in svc["volumes"]


def test_model_override_mounts_the_checkpoint_read_only_for_both_halves() -> None:
    services = _compose("docker-compose.model.yml")["services"]
    for role in ("rx", "tx"):
        (volume,) = services[role]["volumes"]
        assert volume.endswith(":/models/model:ro")
        assert services[role]["environment"][f"SPLITVLM_{role.upper()}_MODEL"] == "/models/model"


def test_tls_override_names_the_certificate_settings() -> None:
    from shared.config import RxSettings, TxSettings

    services = _compose("docker-compose.tls.yml")["services"]
    for role, cls in (("rx", RxSettings), ("tx", TxSettings)):
        prefix = f"SPLITVLM_{role.upper()}_"
        for env in services[role]["environment"]:
            assert env.removeprefix(prefix).lower() in cls.model_fields, env  # a real setting
    assert set(services["rx"]["environment"]) == {
        "SPLITVLM_RX_TLS_CERT",
        "SPLITVLM_RX_TLS_KEY",
        "SPLITVLM_RX_TLS_CLIENT_CA",
    }
    assert set(services["tx"]["environment"]) == {
        "SPLITVLM_TX_TLS_CA",
        "SPLITVLM_TX_TLS_CERT",
        "SPLITVLM_TX_TLS_KEY",
    }
    for role in ("rx", "tx"):
        assert all(v.startswith("/certs/") for v in services[role]["environment"].values())
        assert services[role]["volumes"][0].endswith(":/certs:ro")


def test_dockerfile_runs_as_a_user_exposes_ports_and_has_a_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    assert {50061, 8061, 50051, 8051} <= exposed
    assert re.search(r"^HEALTHCHECK .*CMD \[\"splitvlm\", \"health\"\]", text, re.M)
    install = re.search(r"pip install --no-cache-dir (\S+)", text.split("COPY shared")[1])
    assert install and install.group(1) == ".", "the image installs the server only: no [dev] extras"


def test_dockerignore_keeps_venv_git_and_caches_out_of_the_build_context() -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".mypy_cache", ".pytest_cache", ".cache"} <= ignored
    # ...and nothing the Dockerfile copies is ignored.
    copied = re.findall(r"^COPY (.+) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    for line in copied:
        for path in line.split():
            assert path not in ignored, path
