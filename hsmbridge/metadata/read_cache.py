"""A read cache for the metadata hot path that can never serve a row older than the last commit.

Owns: `ReadCache`. Every cryptographic request reads its key row and its store row; mapping them
cost about half of an in-process Encrypt. Entries are tagged with a generation that moves on:
- every commit made through this process's store (`bump()` after COMMIT), and
- every commit made by any other connection, another process included, which SQLite reports as a
  change of `PRAGMA data_version` on the reading connection (checked on every cached read).
A reader takes the generation *before* it reads the database, so a commit racing with the read
leaves the entry already stale. Reads inside a write transaction bypass the cache.
Must not import keystore, backend, service, api or cli.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
_MAX_ENTRIES = 100_000  # ~20,000 keys per store is the scale target; beyond this, start over


class ReadCache(Generic[V]):
    def __init__(self) -> None:
        self._generation = 0
        self._entries: dict[str, tuple[int, V]] = {}
        self._lock = threading.Lock()
        self._seen = threading.local()  # this thread's last PRAGMA data_version

    def bump(self) -> None:
        with self._lock:
            self._generation += 1

    def _current(self, conn: sqlite3.Connection) -> int:
        """The generation, after noticing commits made by other connections."""
        row = conn.execute("PRAGMA data_version").fetchone()
        version = int(row[0])
        if getattr(self._seen, "version", None) != version:
            # Also on a thread's first read: it cannot know what other connections committed
            # before its baseline, while entries cached by other threads may predate that.
            self._seen.version = version
            self.bump()
        return self._generation

    def get(self, conn: sqlite3.Connection, key: str, load: Callable[[], V]) -> V:
        generation = self._current(conn)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        value = load()
        with self._lock:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (generation, value)
        return value
