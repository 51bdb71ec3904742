"""Timing every HSM call: the request's `hsmLatencyMs`, and an optional observer (metrics).

Owns: `TimedConnector` / `TimedBackend`, the wrapper an edge puts around the connector it hands
the composition root, and the `HsmCallObserver` Protocol. Each HSM call is timed once; the time is
added to the request scope (so the audit-trail event of the call carries it, whichever edge
served it) and, when an observer is given (the HTTP server's Prometheus metrics), reported to it.
In-process users that need neither (the benchmark's service loop) leave the connector unwrapped.
Must not import metadata, service or anything above.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from hsmbridge import nowait
from hsmbridge.backend import BackendError, HsmBackend, HsmConnector, HsmHealth, HsmKeyInfo, Sealed
from hsmbridge.trail import context


class HsmCallObserver(Protocol):
    def hsm_call_started(self) -> None: ...
    def hsm_call_finished(self, call: str, seconds: float, error: str | None) -> None: ...
    def hsm_call_refused(self) -> None: ...  # an inline attempt gave up before the HSM


class TimedBackend:
    """An HsmBackend that times every HSM call; anything else is delegated to the real one."""

    def __init__(self, inner: HsmBackend, observer: HsmCallObserver | None) -> None:
        self.inner = inner
        self._observer = observer

    def __getattr__(self, name: str) -> Any:  # `stats`, `cluster_id`, test hooks
        return getattr(self.inner, name)

    def _timed(self, call: str, fn: Callable[..., Any], *args: Any) -> Any:
        observer = self._observer
        if observer is not None:
            observer.hsm_call_started()
        error: str | None = None
        refused = False
        start = time.perf_counter()
        try:
            return fn(*args)
        except BackendError as exc:
            error = type(exc).__name__
            raise
        except nowait.WouldBlock:
            refused = True  # not an HSM call: the rerun on a worker thread makes it, timed then
            raise
        finally:
            if refused:
                if observer is not None:
                    observer.hsm_call_refused()
            else:
                elapsed = time.perf_counter() - start
                if observer is not None:
                    observer.hsm_call_finished(call, elapsed, error)
                context.add_hsm_latency(elapsed * 1000.0)

    def generate_key(self, label: str, key_id: bytes, *, fresh_label: bool = False) -> HsmKeyInfo:
        info: HsmKeyInfo = self._timed(
            "generate_key",
            lambda: self.inner.generate_key(label, key_id, fresh_label=fresh_label),
        )
        return info

    def find_keys(self, label: str) -> list[HsmKeyInfo]:
        found: list[HsmKeyInfo] = self._timed("find_keys", self.inner.find_keys, label)
        return found

    def list_keys(self) -> Iterator[HsmKeyInfo]:
        # A scan (audit, recovery), not a request-path call: timed as one call when drained.
        keys: list[HsmKeyInfo] = self._timed("list_keys", lambda: list(self.inner.list_keys()))
        return iter(keys)

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        count: int = self._timed("destroy_key", self.inner.destroy_key, label, handle)
        return count

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Sealed:
        sealed: Sealed = self._timed("encrypt", self.inner.encrypt, label, plaintext, aad)
        return sealed

    def decrypt(self, label: str, sealed: Sealed, aad: bytes) -> bytes:
        plain: bytes = self._timed("decrypt", self.inner.decrypt, label, sealed, aad)
        return plain

    def random(self, n_bytes: int) -> bytes:
        out: bytes = self._timed("random", self.inner.random, n_bytes)
        return out

    def ping(self) -> HsmHealth:
        health: HsmHealth = self._timed("ping", self.inner.ping)
        return health

    def close(self) -> None:
        self.inner.close()


class TimedConnector:
    """Wraps a connector so every backend it logs in comes back as a TimedBackend."""

    def __init__(self, inner: HsmConnector, observer: HsmCallObserver | None = None) -> None:
        self.inner = inner
        self._observer = observer

    def connect(self, cluster_id: str, password: str) -> HsmBackend:
        return TimedBackend(self.inner.connect(cluster_id, password), self._observer)

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        self.inner.change_password(cluster_id, old, new)
