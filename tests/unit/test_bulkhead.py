"""Per-store bulkheads and request deadlines (`backend.bulkhead`, `hsmbridge.deadline`): pure
logic with threads, no HSM. The end-to-end proof over SoftHSM2 is
tests/reliability/test_slow_hsm.py."""

from __future__ import annotations

import threading
import time

import pytest

from hsmbridge import deadline
from hsmbridge.backend import DeadlineExceededError, HsmHealth, StoreSaturatedError
from hsmbridge.backend.bulkhead import Bulkhead, BulkheadBackend, BulkheadLimits


def test_limits_take_a_quarter_of_the_threads_each_for_running_and_waiting() -> None:
    assert BulkheadLimits.for_threads(32) == BulkheadLimits(in_flight=8, queue=8)
    assert BulkheadLimits.for_threads(2) == BulkheadLimits(in_flight=1, queue=1)
    with pytest.raises(ValueError, match="in_flight"):
        BulkheadLimits(in_flight=0, queue=1)


def test_deadline_is_per_context_and_absent_by_default() -> None:
    assert deadline.remaining() is None
    assert not deadline.expired()
    with deadline.within(10):
        left = deadline.remaining()
        assert left is not None
        assert 9 < left <= 10
    assert deadline.remaining() is None
    with deadline.within(-1):
        assert deadline.expired()


def test_a_call_past_its_deadline_is_never_started() -> None:
    bulkhead = Bulkhead(BulkheadLimits(2, 2))
    ran = []
    with deadline.within(-0.001), pytest.raises(DeadlineExceededError):
        bulkhead.call(lambda: ran.append(1))
    assert ran == []
    assert bulkhead.load == (0, 0)


def _occupy(bulkhead: Bulkhead, count: int) -> tuple[threading.Event, list[threading.Thread]]:
    release = threading.Event()
    inside = threading.Semaphore(0)

    def hold() -> None:
        def body() -> None:
            inside.release()
            release.wait(10)

        bulkhead.call(body)

    threads = [threading.Thread(target=hold) for _ in range(count)]
    for t in threads:
        t.start()
    for _ in range(count):
        assert inside.acquire(timeout=5)
    return release, threads


def test_beyond_running_and_waiting_limits_calls_are_refused_at_once() -> None:
    bulkhead = Bulkhead(BulkheadLimits(in_flight=2, queue=1))
    release, holders = _occupy(bulkhead, 2)
    waiter_result: list[object] = []

    def wait_for_a_turn() -> None:
        with deadline.within(5):
            waiter_result.append(bulkhead.call(lambda: "ran after waiting"))

    waiter = threading.Thread(target=wait_for_a_turn)
    waiter.start()
    for _ in range(100):
        if bulkhead.load == (2, 1):
            break
        time.sleep(0.01)
    assert bulkhead.load == (2, 1)
    begin = time.monotonic()
    with pytest.raises(StoreSaturatedError):
        bulkhead.call(lambda: None)
    assert time.monotonic() - begin < 0.1  # refused, not queued
    release.set()
    for t in [*holders, waiter]:
        t.join(5)
    assert waiter_result == ["ran after waiting"]
    assert bulkhead.load == (0, 0)


def test_a_waiting_call_gives_up_at_its_deadline() -> None:
    bulkhead = Bulkhead(BulkheadLimits(in_flight=1, queue=4))
    release, holders = _occupy(bulkhead, 1)
    begin = time.monotonic()
    with deadline.within(0.2), pytest.raises(DeadlineExceededError):
        bulkhead.call(lambda: None)
    assert 0.15 < time.monotonic() - begin < 1.0
    assert bulkhead.load == (1, 0)
    release.set()
    for t in holders:
        t.join(5)


def test_a_failing_call_gives_its_slot_back() -> None:
    bulkhead = Bulkhead(BulkheadLimits(in_flight=1, queue=0))

    def boom() -> None:
        raise RuntimeError("hsm said no")

    with pytest.raises(RuntimeError):
        bulkhead.call(boom)
    assert bulkhead.call(lambda: "free again") == "free again"


class _Pinging:
    def ping(self) -> HsmHealth:
        return HsmHealth(True, 1.0, "ok")


def test_a_refused_ping_is_an_unhealthy_answer_not_an_exception() -> None:
    backend = BulkheadBackend(_Pinging(), Bulkhead(BulkheadLimits(1, 0)))  # type: ignore[arg-type]
    assert backend.ping().ok
    with deadline.within(-1):
        health = backend.ping()
    assert not health.ok
    assert "DeadlineExceededError" in health.detail
