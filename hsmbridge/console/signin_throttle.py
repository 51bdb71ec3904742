"""Failed console sign-ins, counted so that nobody can guess secret access keys at speed.

Owns: `SignInThrottle`. Failures are counted per access key ID and per source address in a sliding
window of WINDOW_S; once a key has MAX_KEY_FAILURES there, or an address MAX_ADDRESS_FAILURES
(more: one address may be a whole office behind NAT, guessing at many keys), sign-ins for that
key or from that address are refused (HTTP 429) without looking at the secret, until the oldest
failure leaves the window.
A success does not clear the count: a guesser who also knows one key pair must not reset it.
Counts are per process (each worker and instance has its own), and at most MAX_TRACKED addresses
and keys are remembered (the least recently failed are forgotten first), so a flood of made-up
keys cannot grow memory without bound.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

MAX_KEY_FAILURES: Final = 5
MAX_ADDRESS_FAILURES: Final = 20
WINDOW_S: Final = 60.0
MAX_TRACKED: Final = 10_000


class SignInThrottle:
    def __init__(
        self,
        *,
        max_key_failures: int = MAX_KEY_FAILURES,
        max_address_failures: int = MAX_ADDRESS_FAILURES,
        window_s: float = WINDOW_S,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = {"address": max_address_failures, "key": max_key_failures}
        self._window = window_s
        self._max_tracked = max_tracked
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, source: str, access_key_id: str) -> float:
        """Seconds until a sign-in from `source` for `access_key_id` may be tried; 0: now."""
        now = self._clock()
        with self._lock:
            waits = [self._wait(kind, name, now) for kind, name in _names(source, access_key_id)]
        return max(waits)

    def failed(self, source: str, access_key_id: str) -> None:
        now = self._clock()
        with self._lock:
            for kind, name in _names(source, access_key_id):
                times = self._failures.pop(name, None) or deque(maxlen=self._limits[kind])
                times.append(now)
                self._failures[name] = times  # now the most recently failed
            while len(self._failures) > self._max_tracked:
                self._failures.popitem(last=False)

    def _wait(self, kind: str, name: str, now: float) -> float:
        times = self._failures.get(name)
        if times is None:
            return 0.0
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[name]
            return 0.0
        if len(times) < self._limits[kind]:
            return 0.0
        return times[0] + self._window - now


def _names(source: str, access_key_id: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return ("address", f"address {source}"), ("key", f"key {access_key_id}")
