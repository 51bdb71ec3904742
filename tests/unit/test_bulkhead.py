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
from tests.harness import FakeClock


def test_limits_give_a_store_a_quarter_of_the_threads() -> None:
    assert BulkheadLimits.for_threads(32) == BulkheadLimits(in_flight=8, stall_after_s=2.0)
    assert BulkheadLimits.for_threads(2).in_flight == 1
    with pytest.raises(ValueError, match="in_flight"):
        BulkheadLimits(in_flight=0)
    with pytest.raises(ValueError, match="stall_after_s"):
        BulkheadLimits(in_flight=1, stall_after_s=0)


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
    bulkhead = Bulkhead(BulkheadLimits(2))
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


def test_a_busy_healthy_store_queues_and_refuses_nothing() -> None:
    bulkhead = Bulkhead(BulkheadLimits(in_flight=2))
    done: list[int] = []

    def work(i: int) -> None:
        with deadline.within(10):
            bulkhead.call(lambda: (time.sleep(0.002), done.append(i)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(done) == list(range(64))
    assert bulkhead.load == (0, 0)


def test_a_stalled_store_refuses_new_and_waiting_calls_at_once() -> None:
    clock = FakeClock(100.0)
    bulkhead = Bulkhead(BulkheadLimits(in_flight=2, stall_after_s=2.0), clock=clock)
    release, holders = _occupy(bulkhead, 2)  # both slots taken, nothing finishes
    outcome: list[str] = []

    def wait_for_a_turn() -> None:
        try:
            with deadline.within(30):
                bulkhead.call(lambda: None)
            outcome.append("ran")
        except StoreSaturatedError as exc:
            outcome.append(str(exc))

    waiter = threading.Thread(target=wait_for_a_turn)
    waiter.start()
    for _ in range(100):
        if bulkhead.load == (2, 1):
            break
        time.sleep(0.01)
    assert bulkhead.load == (2, 1)  # not stalled yet: it waits
    clock.advance(2.5)  # every running call has now run for 2.5 s with none finished
    begin = time.monotonic()
    with pytest.raises(StoreSaturatedError, match="not finished any of its 2 running calls"):
        bulkhead.call(lambda: None)
    assert time.monotonic() - begin < 0.1  # refused, not queued
    waiter.join(5)  # the waiter re-checks within RECHECK_S and is refused, long before 30 s
    assert len(outcome) == 1
    assert "not finished" in outcome[0]
    release.set()
    for t in holders:
        t.join(5)
    assert bulkhead.load == (0, 0)
    assert bulkhead.call(lambda: "serving again") == "serving again"


def test_a_waiting_call_gives_up_at_its_deadline() -> None:
    bulkhead = Bulkhead(BulkheadLimits(in_flight=1))
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
    bulkhead = Bulkhead(BulkheadLimits(in_flight=1))

    def boom() -> None:
        raise RuntimeError("hsm said no")

    with pytest.raises(RuntimeError):
        bulkhead.call(boom)
    assert bulkhead.call(lambda: "free again") == "free again"


class _Pinging:
    def ping(self) -> HsmHealth:
        return HsmHealth(True, 1.0, "ok")


def test_a_refused_ping_is_an_unhealthy_answer_not_an_exception() -> None:
    backend = BulkheadBackend(_Pinging(), Bulkhead(BulkheadLimits(1)))  # type: ignore[arg-type]
    assert backend.ping().ok
    with deadline.within(-1):
        health = backend.ping()
    assert not health.ok
    assert "DeadlineExceededError" in health.detail
