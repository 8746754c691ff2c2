"""Faults (issue 12): the Rx started after the Tx, killed mid-answer, restarted — with an Rx
in a separate process, killed with SIGKILL, and nothing restarted by hand on the Tx side."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shared.errors import RemoteError

PROMPT = "What is in the image?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_rx_process(port: int, cache_dir: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"SPLITVLM_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "rx", "serve", "--grpc-port", str(port), "--http-port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.fixture
def rx_port() -> Iterator[int]:
    yield _free_port()


def test_rx_started_late_killed_mid_answer_and_restarted(
    rx_port: int, cache_dir: Path, model_dir: Path, images: list
) -> None:
    from shared.config import TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    # The Tx starts first: the Rx is not there yet (pairing waits for the first request).
    tx = start_tx(
        TxSettings(port=0, rx_address=f"127.0.0.1:{rx_port}", cache_dir=cache_dir, rx_retry_budget_s=90)
    )
    rx = _start_rx_process(rx_port, cache_dir)
    try:
        with TxClient(tx.address, timeout_s=120) as client:
            # 1. Answered once the Rx is up: the Tx retried UNAVAILABLE with backoff meanwhile.
            assert client.ask(images[0], PROMPT, max_new_tokens=3).token_ids

            # 2. SIGKILL the Rx after the first answer chunk: UNAVAILABLE, saying the answer broke off.
            stream = client.ask_stream(images[0], PROMPT, max_new_tokens=500)
            with pytest.raises(RemoteError) as info:
                for chunk in stream:
                    assert not chunk.done, "the 500-token answer finished before the Rx was killed"
                    if rx.poll() is None:
                        rx.send_signal(signal.SIGKILL)
                        rx.wait(30)
            assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
            assert "broke after the answer had started" in info.value.detail

            # 3. A request sent while the Rx is down succeeds once it is back (within the budget).
            rx = _start_rx_process(rx_port, cache_dir)
            started = time.monotonic()
            assert client.ask(images[1], PROMPT, max_new_tokens=3).token_ids
            assert time.monotonic() - started < 90
    finally:
        if rx.poll() is None:
            rx.send_signal(signal.SIGKILL)
            rx.wait(30)
        tx.stop()


def test_rx_down_for_longer_than_the_budget_is_unavailable_with_a_clear_message(
    rx_port: int, cache_dir: Path, images: list
) -> None:
    from shared.config import TxSettings
    from tx_service.client import TxClient
    from tx_service.server import start_tx

    tx = start_tx(
        TxSettings(port=0, rx_address=f"127.0.0.1:{rx_port}", cache_dir=cache_dir, rx_retry_budget_s=1)
    )
    try:
        with TxClient(tx.address, timeout_s=60) as client, pytest.raises(RemoteError) as info:
            client.ask(images[0], PROMPT, max_new_tokens=2)
        assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE
        assert "stayed unreachable for 1 s" in info.value.detail
    finally:
        tx.stop()
