"""A read cache for the metadata hot path that can never serve a row older than the last commit.

Owns: `ReadCache`. Every cryptographic request reads its key row and its store row; mapping them
cost about half of an in-process Encrypt. Entries are tagged with a generation that moves on:
- every commit made through this process's store (`bump()` after COMMIT), and
- every commit made by any other connection, another process included, which the engine reports
  as a new *change token* from the reading thread's connection (checked on every cached read;
  SQLite: `PRAGMA data_version`). The token is opaque here: only its equality matters.
A reader takes the generation *before* it reads the database, so a commit racing with the read
leaves the entry already stale. Reads inside a write transaction bypass the cache (the engine's
job: it knows when it is inside one).
Must not import any database driver, keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
_MAX_ENTRIES = 100_000  # ~20,000 keys per store is the scale target; beyond this, start over
_UNSEEN = object()  # no token read yet on this thread; never equal to an engine's token

ChangeToken = Callable[[], object]
"""Returns the calling thread's view of the database's change counter; equal tokens on one
thread mean no other connection committed in between."""


class ReadCache(Generic[V]):
    def __init__(self, change_token: ChangeToken) -> None:
        self._change_token = change_token
        self._generation = 0
        self._entries: dict[str, tuple[int, V]] = {}
        self._lock = threading.Lock()
        self._seen = threading.local()  # this thread's last change token

    def bump(self) -> None:
        with self._lock:
            self._generation += 1

    def _current(self) -> int:
        """The generation, after noticing commits made by other connections."""
        token = self._change_token()
        if getattr(self._seen, "token", _UNSEEN) != token:
            # Also on a thread's first read: it cannot know what other connections committed
            # before its baseline, while entries cached by other threads may predate that.
            self._seen.token = token
            self.bump()
        return self._generation

    def get(self, key: str, load: Callable[[], V]) -> V:
        generation = self._current()
        hit = self._entries.get(key)
        if hit is not None and hit[0] == generation:
            return hit[1]
        value = load()
        with self._lock:
            if len(self._entries) >= _MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (generation, value)
        return value
