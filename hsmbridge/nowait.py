"""Requests run on the event loop itself: they must never wait, so every wait becomes a refusal.

Owns: `WouldBlock`, `attempt()` and `refuse()`. Handing a request to a worker thread and its
answer back costs two thread wake-ups; on a two-vCPU VM that measured ~160 us per request, four
times the HSM's own AES-GCM call. So the HTTP edge may run a cryptographic request directly on its
event loop when the store's HSM is a local library that answers in microseconds. The loop is then
shared by every connection of the process, so such a request must not wait for anything: a lock
another thread holds, a login, a re-initialisation, a retry pause, a slot of a full bulkhead, a
cache refill that reads a file or the network. Each place below that could wait calls `refuse()`
first; inside an inline attempt it raises `WouldBlock`, the edge catches it and runs the same
request again, from the start, on its HSM thread pool, where waiting is allowed (and bounded by
the request's deadline). Outside an inline attempt `refuse()` does nothing.

A refused attempt has had no effect a client could see: it happens before any HSM call that
changes state, and what a request counts once (its request quota charge) is counted once per
request, across both runs, through `first_time()`.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


class WouldBlock(Exception):  # noqa: N818 - a signal between layers, never an error a client sees
    """An inline attempt reached something that would wait; run the request on a thread."""


class _Attempt:
    __slots__ = ("done", "inline")

    def __init__(self) -> None:
        self.inline = True
        self.done: set[str] = set()


_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("hsmbridge_nowait_attempt", default=None)


def attempt(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` as an inline attempt; WouldBlock leaves it with the attempt over, so that
    running `fn` again in the same context (`contextvars.Context.run`) waits normally and shares
    the attempt's `first_time` marks. Call it inside a context copied for this one request."""
    current = _Attempt()
    _ATTEMPT.set(current)
    try:
        return fn(*args)
    except WouldBlock:
        current.inline = False
        raise


def inline() -> bool:
    """Is this code running inside an inline attempt?"""
    current = _ATTEMPT.get()
    return current is not None and current.inline


def refuse(what: str) -> None:
    """Call before anything that could wait: `what` says what, for the edge's counters."""
    current = _ATTEMPT.get()
    if current is not None and current.inline:
        raise WouldBlock(what)


def first_time(mark: str) -> bool:
    """True unless `mark` was already recorded in this request's earlier, refused attempt.
    Outside an inline attempt and its rerun, always True."""
    current = _ATTEMPT.get()
    if current is None:
        return True
    if mark in current.done:
        return False
    current.done.add(mark)
    return True
