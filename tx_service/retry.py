"""Retries of the Tx's calls to the Rx on UNAVAILABLE, with exponential backoff and full jitter.

A Generate call is idempotent until its first answer chunk: the Rx has produced nothing the
client saw. So an UNAVAILABLE before the first chunk (Rx restarting, not started yet, a
dropped connection) is retried, waiting 0.1 s, 0.2 s, 0.4 s, … (at most 2 s, each scaled by a
random factor in [0.5, 1] so that many Tx do not retry in step), until the retry budget is
spent. After the first chunk the error goes to the client, saying the answer broke off.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from shared.errors import RemoteError

T = TypeVar("T")
log = logging.getLogger("splitvlm.tx")

BASE_DELAY_S = 0.1
MAX_DELAY_S = 2.0


def _delay(attempt: int) -> float:
    return min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt) * random.uniform(0.5, 1.0)


def _give_up(exc: RemoteError, attempts: int, budget_s: float) -> RemoteError:
    return RemoteError(
        grpc.StatusCode.UNAVAILABLE,
        f"the Rx stayed unreachable for {budget_s:g} s ({attempts} attempts; rx_retry_budget_s): "
        f"{exc.detail}",
        "tx",
    )


def call_with_retry(call: Callable[[], T], budget_s: float) -> T:
    """`call()`, retried on UNAVAILABLE within `budget_s` seconds."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        try:
            return call()
        except RemoteError as exc:
            if exc.grpc_code != grpc.StatusCode.UNAVAILABLE:
                raise
            delay = _delay(attempt)
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise _give_up(exc, attempt, budget_s) from None
            log.info("Rx unavailable (%s); retry %d in %.2f s", exc.detail, attempt, delay)
            time.sleep(delay)


def stream_with_retry(open_stream: Callable[[], Iterator[T]], budget_s: float) -> Iterator[T]:
    """The chunks of `open_stream()`; reopened on UNAVAILABLE until the first chunk arrives."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        started = False
        try:
            for item in open_stream():
                started = True
                yield item
            return
        except RemoteError as exc:
            if exc.grpc_code != grpc.StatusCode.UNAVAILABLE:
                raise
            if started:
                raise RemoteError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the connection to the Rx broke after the answer had started ({exc.detail}); "
                    "the answer is incomplete: ask again",
                    "tx",
                ) from None
            delay = _delay(attempt)
            attempt += 1
            if time.monotonic() + delay > deadline:
                raise _give_up(exc, attempt, budget_s) from None
            log.info("Rx unavailable (%s); retry %d in %.2f s", exc.detail, attempt, delay)
            time.sleep(delay)
