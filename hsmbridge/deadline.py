"""The current request's deadline, readable in every layer down to the backend.

Owns: one `ContextVar` holding the monotonic time by which the request being served must be
answered. The HTTP edge starts it when it hands a request to a worker thread (the thread runs in
a copy of the request's context, so the deadline travels with it); the backend reads it before it
waits for anything on the HSM's side (a session, the library lock, a per-store slot), so work a
client has already given up on is never started on the HSM. No deadline (the CLI, background
work): waits are unbounded, as before.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_DEADLINE: ContextVar[float | None] = ContextVar("hsmbridge_deadline", default=None)


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Run the block with a deadline `seconds` from now (None: no deadline)."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def start(seconds: float | None) -> None:
    """Set the deadline of the current context (a request task, before it hands work on)."""
    _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)


def remaining() -> float | None:
    """Seconds left (≤ 0 once passed), or None when there is no deadline."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def expired() -> bool:
    left = remaining()
    return left is not None and left <= 0


def wait(cond: threading.Condition) -> bool:
    """`cond.wait()` for no longer than the deadline (held by the caller, as for any wait);
    False, without waiting, once the deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        return False
    cond.wait(left)
    return True
