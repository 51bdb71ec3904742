"""Per-store bulkheads: how many calls one custom key store's HSM may have running, and when
waiting for it is pointless.

Owns: `Bulkhead` and `BulkheadConnector` / `BulkheadBackend`, the wrapper the composition root
puts around the connector so every login (one per store and process) gets its own bulkhead.
At most `in_flight` calls of a store run at once; more wait their turn, each no longer than its
request's deadline (`DeadlineExceededError`: never started). A healthy HSM answers in
milliseconds, so waiting is brief and nothing is refused however many requests queue (a burst of
64 clients on one store must not fail). A stalled one, whose calls have all been running for
`stall_after_s` with none finishing, refuses new calls and wakes its waiters to refuse them too
(`StoreSaturatedError`, retryable): a stuck cluster then holds `in_flight` worker threads, not
every thread the server has, and its clients learn at once instead of at their deadline.
Must not import anything in hsmbridge above `hsmbridge.backend`, `hsmbridge.deadline` and
`hsmbridge.nowait`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from hsmbridge import deadline, nowait
from hsmbridge.backend.errors import BackendError, DeadlineExceededError, StoreSaturatedError
from hsmbridge.backend.interface import HsmBackend, HsmConnector, HsmHealth, HsmKeyInfo, Sealed

T = TypeVar("T")
# A waiter re-checks whether the store has stalled this often (it is also woken by progress).
RECHECK_S: Final = 0.25


@dataclass(frozen=True)
class BulkheadLimits:
    """Per store and process: calls running on its HSM at once, and how long every one of them
    may run with none finishing before the store counts as stalled."""

    in_flight: int
    stall_after_s: float = 2.0

    def __post_init__(self) -> None:
        if self.in_flight < 1 or not self.stall_after_s > 0:
            raise ValueError(f"bulkhead limits must be in_flight ≥ 1, stall_after_s > 0: {self}")

    @classmethod
    def for_threads(cls, threads: int, stall_after_s: float = 2.0) -> BulkheadLimits:
        """A quarter of the HSM worker threads per store: a stalled cluster leaves the others
        three quarters to run on."""
        return cls(in_flight=max(1, threads // 4), stall_after_s=stall_after_s)


class Bulkhead:
    def __init__(
        self, limits: BulkheadLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._running = 0
        self._waiting = 0
        # When the store last became full (all `in_flight` slots taken). Every call that
        # finishes and lets a waiter in moves it, so only a store making no progress grows old.
        self._full_since = 0.0

    def call(self, fn: Callable[[], T]) -> T:
        self._enter()
        try:
            return fn()
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify()

    def _stalled_for(self) -> float:
        """Seconds the store has been full with no call finishing (0: not stalled). Lock held."""
        if self._running < self.limits.in_flight:
            return 0.0
        stuck = self._clock() - self._full_since
        return stuck if stuck >= self.limits.stall_after_s else 0.0

    def _saturated(self, stuck: float) -> StoreSaturatedError:
        return StoreSaturatedError(
            f"the HSM has not finished any of its {self._running} running calls for {stuck:.1f} s"
        )

    def _take_slot(self) -> None:
        self._running += 1
        if self._running == self.limits.in_flight:
            self._full_since = self._clock()

    def _enter(self) -> None:
        if deadline.expired():
            raise DeadlineExceededError("the request's deadline passed before the HSM call")
        with self._cond:
            if self._running < self.limits.in_flight:
                self._take_slot()
                return
            nowait.refuse("the store's bulkhead is full")
            stuck = self._stalled_for()
            if stuck:
                raise self._saturated(stuck)
            self._waiting += 1
            try:
                while self._running >= self.limits.in_flight:
                    stuck = self._stalled_for()
                    if stuck:
                        raise self._saturated(stuck)
                    left = deadline.remaining()
                    if left is not None and left <= 0:
                        raise DeadlineExceededError(
                            "the request's deadline passed while it waited for the HSM"
                        )
                    self._cond.wait(RECHECK_S if left is None else min(left, RECHECK_S))
            finally:
                self._waiting -= 1
            self._take_slot()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting), for health and tests."""
        with self._cond:
            return self._running, self._waiting


class BulkheadBackend:
    """An HsmBackend whose HSM calls pass through one store's `Bulkhead`."""

    def __init__(self, inner: HsmBackend, bulkhead: Bulkhead) -> None:
        self.inner = inner
        self.bulkhead = bulkhead

    def __getattr__(self, name: str) -> Any:  # `stats`, `cluster_id`, test hooks
        return getattr(self.inner, name)

    def generate_key(self, label: str, key_id: bytes, *, fresh_label: bool = False) -> HsmKeyInfo:
        return self.bulkhead.call(
            lambda: self.inner.generate_key(label, key_id, fresh_label=fresh_label)
        )

    def find_keys(self, label: str) -> list[HsmKeyInfo]:
        return self.bulkhead.call(lambda: self.inner.find_keys(label))

    def list_keys(self) -> Iterator[HsmKeyInfo]:
        return iter(self.bulkhead.call(lambda: list(self.inner.list_keys())))

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        return self.bulkhead.call(lambda: self.inner.destroy_key(label, handle))

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Sealed:
        return self.bulkhead.call(lambda: self.inner.encrypt(label, plaintext, aad))

    def decrypt(self, label: str, sealed: Sealed, aad: bytes) -> bytes:
        return self.bulkhead.call(lambda: self.inner.decrypt(label, sealed, aad))

    def random(self, n_bytes: int) -> bytes:
        return self.bulkhead.call(lambda: self.inner.random(n_bytes))

    def ping(self) -> HsmHealth:
        try:
            return self.bulkhead.call(self.inner.ping)
        except BackendError as exc:  # a saturated or late store is an unhealthy one, not a crash
            return HsmHealth(ok=False, latency_ms=0.0, detail=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.inner.close()


class BulkheadConnector:
    """Wraps a connector so each login it makes gets a bulkhead of its own."""

    def __init__(self, inner: HsmConnector, limits: BulkheadLimits) -> None:
        self.inner = inner
        self.limits = limits

    def connect(self, cluster_id: str, password: str) -> HsmBackend:
        return BulkheadBackend(self.inner.connect(cluster_id, password), Bulkhead(self.limits))

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        self.inner.change_password(cluster_id, old, new)
