"""Shared fixtures: the embedded tiny model in a per-session cache, and live services on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the tiny random model (fast); tests of the shipped reference model name it.
TEST_MODEL = "builtin:tiny-llava"
os.environ.setdefault("SPLITVLM_RX_MODEL", TEST_MODEL)
os.environ.setdefault("SPLITVLM_TX_MODEL", TEST_MODEL)
# Every Tx a test starts serves /metrics on a free port, never the fixed default (8051).
os.environ.setdefault("SPLITVLM_TX_METRICS_PORT", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("splitvlm-cache")
    os.environ["SPLITVLM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dir(cache_dir: Path) -> Path:
    from shared.models.registry import resolve_model

    return resolve_model(TEST_MODEL, cache_dir)


@pytest.fixture(scope="session")
def rx(cache_dir: Path, model_dir: Path) -> Iterator[object]:
    from rx_service.server import start_rx
    from shared.config import RxSettings

    # The session Rx accepts any calibration-free codec: tests send many specs.
    running = start_rx(RxSettings(grpc_port=0, http_port=0, cache_dir=cache_dir, codecs=["any"]))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tx(rx: object, cache_dir: Path) -> Iterator[object]:
    from shared.config import TxSettings
    from tx_service.server import start_tx

    running = start_tx(
        TxSettings(port=0, rx_address=rx.grpc_address, cache_dir=cache_dir),  # type: ignore[attr-defined]
        require_rx=True,
    )
    yield running
    running.stop()


def make_images() -> list[Image.Image]:
    """Varied inputs: noise, a gradient, shapes on a colour, a non-square photo-like array."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    grad = np.linspace(0, 255, 160, dtype=np.float32)
    gradient = Image.fromarray(
        np.stack(
            [np.tile(grad, (120, 1)), np.tile(grad[::-1], (120, 1)), np.full((120, 160), 128.0)], -1
        ).astype(np.uint8)
    )
    shapes = Image.new("RGB", (200, 140), (30, 140, 60))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse([20, 20, 80, 80], fill=(220, 30, 30))
    draw.rectangle([120, 50, 180, 120], fill=(240, 240, 30))
    return [noise, gradient, shapes]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return make_images()


@pytest.fixture(scope="session")
def make_rx(rx: object, cache_dir: Path) -> Iterator[object]:
    """Start another Rx over the session Rx's loaded model, with settings overridden (TLS, tokens,
    timeouts, limits); every one started is stopped at the end of the session."""
    from rx_service.engine import RxEngine
    from rx_service.server import start_rx
    from shared.config import RxSettings

    started: list[object] = []
    base = rx.engine  # type: ignore[attr-defined]

    def make(http: bool = True, **overrides: object) -> object:
        fields: dict[str, object] = {
            "grpc_port": 0,
            "http_port": 0,
            "cache_dir": cache_dir,
            "codecs": ["any"],
        }
        settings = RxSettings(**(fields | overrides))  # type: ignore[arg-type]
        engine = RxEngine(
            settings=settings,
            half=base.half,
            model_id=base.model_id,
            fingerprint=base.fingerprint,
            architecture=base.architecture,
            notice=base.notice,
            artifacts=base.artifacts,
        )
        running = start_rx(settings, engine=engine, http=http)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()  # type: ignore[attr-defined]
