"""Admission control: a bounded number of requests run, a bounded number wait, the rest are refused.

    request ─► slot free? ─► run
                  └─ no ─► queue (≤ max_queued, ≤ queue_timeout_s) ─► run
                                └─ full / timed out ─► OverloadedError (RESOURCE_EXHAUSTED / 429, Retry-After)

A refused client learns when to come back (`retry_after_s`: the recent mean service time times
the requests ahead of it) instead of waiting behind an unbounded line.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from shared.errors import SplitVlmError


class OverloadedError(SplitVlmError):
    """The server is busy: every slot and queue place is taken."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(f"{message}; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestTimeoutError(SplitVlmError):
    """The request ran past its deadline (the server's request_timeout_s or the client's)."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Admission:
    """FIFO admission with direct hand-over: a finished request hands its slot to the head of the
    queue and wakes only that waiter. A newcomer never overtakes waiting requests, and a release
    does not wake every waiter (with a shared condition, 31 waiters woke per release and queued
    for the GIL: throughput fell several-fold under 32 clients)."""

    def __init__(self, max_concurrent: int, max_queued: int, queue_timeout_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._queue: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()
        self._mean_s = 1.0  # running mean of service time, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def retry_after_s(self) -> int:
        ahead = self.active + self.waiting + 1
        return max(1, math.ceil(self._mean_s * ahead / self.max_concurrent))

    def acquire(self, deadline: float | None = None) -> None:
        """Take a slot, waiting in the bounded queue; OverloadedError / RequestTimeoutError if not."""
        with self._lock:
            if self.active < self.max_concurrent and not self._queue:
                self.active += 1
                return
            if len(self._queue) >= self.max_queued:
                raise OverloadedError(
                    f"server busy: {self.active} requests running and {self.waiting} queued (the limit)",
                    self.retry_after_s(),
                )
            ticket = threading.Event()  # set = the slot was handed to this waiter
            self._queue.append(ticket)
        end = time.monotonic() + self.queue_timeout_s
        if deadline is not None and deadline < end:
            end = deadline
        if ticket.wait(max(0.0, end - time.monotonic())):
            return
        with self._lock:
            if ticket.is_set():  # handed over just as the wait ended: keep it
                return
            self._queue.remove(ticket)
        if deadline is not None and end == deadline:
            raise RequestTimeoutError("the request's deadline passed while it was queued")
        raise OverloadedError(f"server busy: no slot within {self.queue_timeout_s:g} s", self.retry_after_s())

    def release(self, service_s: float) -> None:
        with self._lock:
            self._mean_s = 0.8 * self._mean_s + 0.2 * service_s
            if self._queue:
                self._queue.popleft().set()  # the slot passes on; `active` is unchanged
            else:
                self.active -= 1

    @contextmanager
    def slot(self, deadline: float | None = None) -> Iterator[None]:
        self.acquire(deadline)
        started = time.monotonic()
        try:
            yield
        finally:
            self.release(time.monotonic() - started)
