"""`HeldLock`: a lock held by another thread for the length of a `with` block (at most
`seconds`), as a PKCS#11 call stuck in the HSM holds the library's lock."""

from __future__ import annotations

import threading
from typing import Any


class HeldLock:
    def __init__(self, lock: Any, seconds: float = 30.0) -> None:
        self._lock = lock
        self._seconds = seconds
        self.holding = threading.Event()
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        with self._lock:
            self.holding.set()
            self.release.wait(self._seconds)

    def __enter__(self) -> HeldLock:
        self._thread.start()
        assert self.holding.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread.join(10)
