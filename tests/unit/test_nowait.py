"""`hsmbridge.nowait`: inline attempts refuse to wait, their reruns do not, and what a request
counts once is counted once across both."""

from __future__ import annotations

import contextvars

import pytest

from hsmbridge import nowait


def _charge(charges: list[str], then: str | None = None) -> str:
    if nowait.first_time("quota"):
        charges.append("quota")
    if then is not None:
        nowait.refuse(then)
    return "done"


def test_outside_an_attempt_nothing_is_refused_and_everything_counts() -> None:
    charges: list[str] = []
    assert not nowait.inline()
    nowait.refuse("anything")
    assert _charge(charges) == _charge(charges) == "done"
    assert charges == ["quota", "quota"]


def test_an_attempt_refuses_and_its_rerun_waits_and_counts_nothing_twice() -> None:
    charges: list[str] = []
    ctx = contextvars.copy_context()
    with pytest.raises(nowait.WouldBlock, match="a lock"):
        ctx.run(nowait.attempt, _charge, charges, "a lock")
    assert ctx.run(nowait.inline) is False
    assert ctx.run(_charge, charges, "a lock") == "done"  # the rerun: refuse() lets it wait
    assert charges == ["quota"]


def test_each_request_has_its_own_attempt() -> None:
    charges: list[str] = []
    for _ in range(3):
        ctx = contextvars.copy_context()
        assert ctx.run(nowait.attempt, _charge, charges) == "done"
        assert ctx.run(nowait.inline) is True
    assert charges == ["quota"] * 3
    assert not nowait.inline()  # nothing leaked into the caller's context
