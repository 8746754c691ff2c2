"""Admission control is first come, first served: a newcomer cannot overtake waiting requests
(a barging queue let one request of a 10-minute load test wait 61 s)."""

from __future__ import annotations

import threading
import time

import pytest

from shared.admission import Admission, OverloadedError


def _wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_waiters_are_served_in_arrival_order_and_newcomers_queue_behind() -> None:
    admission = Admission(max_concurrent=1, max_queued=8, queue_timeout_s=30)
    admission.acquire()
    order: list[str] = []

    def request(name: str) -> None:
        admission.acquire()
        order.append(name)
        admission.release(0.0)

    threads = []
    for i, name in enumerate("abcd"):
        t = threading.Thread(target=request, args=(name,))
        t.start()
        threads.append(t)
        _wait_until(lambda n=i + 1: admission.waiting == n)
    admission.release(0.0)
    # A newcomer arriving while the queue drains must not take a slot ahead of it.
    late = threading.Thread(target=request, args=("late",))
    late.start()
    for t in [*threads, late]:
        t.join(10)
    assert order == ["a", "b", "c", "d", "late"]
    assert admission.active == 0 and admission.waiting == 0


def test_full_queue_refuses_with_retry_after_and_a_timed_out_waiter_leaves_the_queue() -> None:
    admission = Admission(max_concurrent=1, max_queued=1, queue_timeout_s=0.2)
    admission.acquire()
    with pytest.raises(OverloadedError, match=r"no slot within 0\.2 s"):
        admission.acquire()  # queued, then timed out
    assert admission.waiting == 0
    refused: list[OverloadedError] = []

    def wait_in_queue() -> None:
        try:
            admission.acquire()
        except OverloadedError as exc:  # times out after 0.2 s
            refused.append(exc)

    blocker = threading.Thread(target=wait_in_queue)
    blocker.start()
    _wait_until(lambda: admission.waiting == 1)
    with pytest.raises(OverloadedError) as info:
        admission.acquire()  # queue full: refused at once
    assert info.value.retry_after_s >= 1 and "queued (the limit)" in str(info.value)
    blocker.join(10)
    assert len(refused) == 1
    admission.release(0.0)
    admission.acquire()  # free again
    admission.release(0.0)
