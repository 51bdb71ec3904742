"""Per-store bulkheads: how many calls one custom key store's HSM may have running or waiting.

Owns: `Bulkhead` (a bounded number of calls in flight plus a bounded queue, every wait cut short
by the request's deadline) and `BulkheadConnector` / `BulkheadBackend`, the wrapper the
composition root puts around the connector so every login (one per store and process) gets its
own bulkhead. A slow or stuck HSM then holds at most `in_flight + queue` of the server's worker
threads, however many requests arrive for it; the rest are refused at once with
`StoreSaturatedError`, and a call whose deadline passed while it waited is refused with
`DeadlineExceededError` without being started. Both are retryable for the client.
Must not import anything in hsmbridge above `hsmbridge.backend` and `hsmbridge.deadline`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from hsmbridge import deadline
from hsmbridge.backend.errors import BackendError, DeadlineExceededError, StoreSaturatedError
from hsmbridge.backend.interface import HsmBackend, HsmConnector, HsmHealth, HsmKeyInfo, Sealed

T = TypeVar("T")


@dataclass(frozen=True)
class BulkheadLimits:
    """Per store and process: calls running on its HSM at once, and calls waiting for a turn."""

    in_flight: int
    queue: int

    def __post_init__(self) -> None:
        if self.in_flight < 1 or self.queue < 0:
            raise ValueError(f"bulkhead limits must be in_flight ≥ 1, queue ≥ 0: {self}")

    @classmethod
    def for_threads(cls, threads: int) -> BulkheadLimits:
        """One store may occupy at most half of `threads` HSM worker threads (a quarter running,
        a quarter waiting), so a stuck cluster leaves the others threads to run on."""
        quarter = max(1, threads // 4)
        return cls(in_flight=quarter, queue=quarter)


class Bulkhead:
    def __init__(self, limits: BulkheadLimits) -> None:
        self.limits = limits
        self._cond = threading.Condition(threading.Lock())
        self._running = 0
        self._waiting = 0

    def call(self, fn: Callable[[], T]) -> T:
        self._enter()
        try:
            return fn()
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify()

    def _enter(self) -> None:
        if deadline.expired():
            raise DeadlineExceededError("the request's deadline passed before the HSM call")
        with self._cond:
            if self._running < self.limits.in_flight:
                self._running += 1
                return
            if self._waiting >= self.limits.queue:
                raise StoreSaturatedError(
                    f"{self._running} HSM calls are running and {self._waiting} waiting"
                )
            self._waiting += 1
            try:
                while self._running >= self.limits.in_flight:
                    if not deadline.wait(self._cond):
                        raise DeadlineExceededError(
                            "the request's deadline passed while it waited for the HSM"
                        )
            finally:
                self._waiting -= 1
            self._running += 1

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
