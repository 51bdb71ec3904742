"""SQLite implementation of the `MetadataStore` Protocol, safe across threads and processes.

Owns: per-thread connections, the `write()` transaction, error translation and the read cache.
The queries are `metadata.queries` (shared with PostgreSQL), the schema `metadata.ddl`, opening
and migrating the file `metadata.schema`.

Durability: WAL with `synchronous=FULL`. NORMAL can lose the last commits on power loss, and a
lost CreateKey row means an HSM key nobody can name while a client already holds its key id and
ciphertexts; metadata writes are rare next to crypto calls, so one extra fsync per commit is cheap.

Concurrency: one connection per thread (threading.local). `write()` takes SQLite's write lock up
front (`BEGIN IMMEDIATE`), so a check-then-act inside it is serialised against every other thread
and process; readers are never blocked (WAL). A nested `write()` joins the outer transaction
through a SAVEPOINT, so an exception inside it undoes only its own changes.

Errors: a write lock not obtained within the busy timeout (another process holds it) is a
`DependencyTimeoutException`, retryable like an HSM that is busy; a constraint violation is a
`MetadataConflictError`. Both keep the sqlite3 error as their cause.

Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hsmbridge.errors import DependencyTimeoutException
from hsmbridge.metadata.queries import SqlQueries
from hsmbridge.metadata.read_cache import ReadCache
from hsmbridge.metadata.schema import (
    BUSY_TIMEOUT_S,
    MIGRATIONS,
    SCHEMA_VERSION,
    create_private_file,
    migrate,
    open_connection,
    restrict_sidecars,
    rollback,
)
from hsmbridge.metadata.store import (
    MetadataConflictError,
    MetadataStoreClosedError,
)

__all__ = [
    "BUSY_TIMEOUT_S",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MetadataStoreClosedError",
    "SqliteMetadataStore",
]


T = TypeVar("T")
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _raise_translated(exc: sqlite3.Error) -> NoReturn:
    """Raise the hsmbridge error for a sqlite3 error, or the error itself (a bug, a bad file)."""
    if isinstance(exc, sqlite3.IntegrityError):
        raise MetadataConflictError(f"the metadata database refused the change: {exc}") from exc
    code = getattr(exc, "sqlite_errorcode", None)
    if (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and code & 0xFF in _BUSY_CODES
    ):
        raise DependencyTimeoutException(
            "The metadata database stayed locked by another process. Try again."
        ) from exc
    raise exc


class _ThreadState(threading.local):
    conn: sqlite3.Connection | None = None
    depth: int = 0  # nesting of write() on this thread


class SqliteMetadataStore(SqlQueries):
    shared = False  # one server's file: its start-up runs before any of its processes serves

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = _ThreadState()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # The hot path reads one key row and one store row per cryptographic request.
        # Key rows and store rows, by "table/id": one change-token read per cached read.
        self._cache: ReadCache[Any] = ReadCache(self._data_version)
        create_private_file(self.path)
        try:
            migrate(self._conn(), self.path)
        except BaseException:
            self.close()
            raise
        restrict_sidecars(self.path)

    def __repr__(self) -> str:
        return f"SqliteMetadataStore({str(self.path)!r})"

    # -- connections and transactions ------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise MetadataStoreClosedError(f"metadata store {self.path} is closed")
        conn = self._local.conn
        if conn is None:
            conn = open_connection(self.path)
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _data_version(self) -> int:
        """The read caches' change token: moves when another connection commits (SQLite doc)."""
        row = self._conn().execute("PRAGMA data_version").fetchone()
        return int(row[0])

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """BEGIN IMMEDIATE on this thread's connection; nested calls join it via a SAVEPOINT."""
        conn = self._conn()
        state = self._local
        if state.depth:
            yield from self._nested(conn, state)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            _raise_translated(exc)
        state.depth = 1
        try:
            yield
        except BaseException:
            rollback(conn)
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                rollback(conn)
                _raise_translated(exc)
            except BaseException:
                rollback(conn)
                raise
            finally:
                # After COMMIT (and on a failed one, to be safe): cached rows may now be stale.
                self._cache.bump()
        finally:
            state.depth = 0

    def _nested(self, conn: sqlite3.Connection, state: _ThreadState) -> Iterator[None]:
        name = f"sp{state.depth}"
        conn.execute(f"SAVEPOINT {name}")
        state.depth += 1
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
            raise
        else:
            conn.execute(f"RELEASE {name}")
        finally:
            state.depth -= 1

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A change; outside write() it commits by itself, so cached reads are stale now."""
        try:
            self._conn().execute(sql, params)
        except sqlite3.Error as exc:
            _raise_translated(exc)
        if not self._local.depth:
            self._cache.bump()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn().execute(sql, params).fetchone()
        return row

    def hold_maintenance(self) -> bool:
        return True  # one server's file: its supervisor (or single process) is the only sweeper

    def _cached(self, table: str, key: str, load: Callable[[], T]) -> T:
        if self._local.depth:  # inside write(): read this transaction's own view
            return load()
        row: T = self._cache.get(f"{table}/{key}", load)
        return row

    def close(self) -> None:
        """Close every thread's connection; call once, when no other thread uses the store."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local.conn = None
