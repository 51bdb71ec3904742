"""PostgreSQL implementation of the `MetadataStore` Protocol, for several hsmbridge instances
sharing one database.

Owns: the connection pool, the `write()` transaction and error translation. The queries are
`metadata.queries` and the schema `metadata.ddl` (both shared with SQLite); migrating and the
write lock live in `metadata.postgres_schema`.

Concurrency: connections come from a psycopg_pool pool, in autocommit mode. A read outside
`write()` borrows one for a single statement, so it sees the last commit. `write()` keeps one
connection for its thread, opens a transaction and first takes the transaction-level advisory
lock `WRITE_LOCK` (`pg_advisory_xact_lock`), released by COMMIT or ROLLBACK: one writer at a time
across threads, processes and hosts, which makes every check-then-act in the service atomic, as
SQLite's BEGIN IMMEDIATE does. Under that lock READ COMMITTED sees every earlier commit and no
other writer can commit meanwhile. A nested `write()` on the same thread joins the outer one
through a SAVEPOINT, so an exception inside it undoes only its own changes. Unlike SQLite, a
statement that fails inside `write()` dooms the whole transaction; nothing continues after one.

No read cache: `metadata.read_cache` is invalidated by SQLite's per-file `data_version`, which
has no cross-host equivalent here, and a stale key state or policy served by one instance after
another changed it is a security bug. Every read goes to the database.

Errors: a database that is down, unreachable or too slow (no pooled connection within
`pool_timeout_s`, default 5 s; a connection lost mid-statement) is a `DependencyTimeoutException`,
retryable, and the pool reconnects by itself once the database is back. A change the schema
refuses is a `MetadataConflictError`. WARNING: the URL may hold a password; only `mask_url(url)`
appears in a repr, log line or message.
Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from hsmbridge.config import mask_url
from hsmbridge.errors import ConfigError, DependencyTimeoutException
from hsmbridge.metadata.postgres_schema import MAINTENANCE_LOCK, WRITE_LOCK, migrate
from hsmbridge.metadata.queries import SqlQueries
from hsmbridge.metadata.store import MetadataConflictError, MetadataStoreClosedError

log = logging.getLogger(__name__)

POOL_TIMEOUT_S: Final = 5.0  # fail fast while the database is down
POOL_MAX_CONNECTIONS: Final = 16  # per process; a server worker has fewer request threads
# How long one background reconnection keeps retrying (with backoff) before it gives up and the
# next request starts a fresh one: bounds how late the pool notices the database is back.
_RECONNECT_TIMEOUT_S: Final = 10.0
_UNAVAILABLE: Final = "The metadata database did not answer in time. Try again."


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """`metadata.queries` writes `?`; psycopg takes `%s`. The statements are this package's own
    constants (never input) and contain neither character otherwise."""
    return sql.replace("?", "%s")


class _ThreadState(threading.local):
    conn: psycopg.Connection[Any] | None = None  # this thread's write() transaction


class PostgresMetadataStore(SqlQueries):
    shared = True  # the engine for several instances: any of them may be serving right now

    def __init__(
        self,
        url: str,
        *,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        max_connections: int = POOL_MAX_CONNECTIONS,
    ) -> None:
        self._url = url  # WARNING: may hold a password; never shown, see _shown
        self._shown = mask_url(url)
        self._local = _ThreadState()
        self._closed = False
        self._connect_timeout = max(1, math.ceil(pool_timeout_s))
        self._maintenance_guard = threading.Lock()
        self._maintenance_conn: psycopg.Connection[Any] | None = None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            open=False,
            min_size=1,
            max_size=max_connections,
            timeout=pool_timeout_s,
            reconnect_timeout=_RECONNECT_TIMEOUT_S,
            # A connection idle through a database restart is dead; find out before using it.
            check=ConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "connect_timeout": max(1, math.ceil(pool_timeout_s)),
                "application_name": "hsmbridge",
            },
            name="hsmbridge-metadata",
        )
        try:
            self._pool.open(wait=False)
            self._migrate(pool_timeout_s)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresMetadataStore({self._shown!r})"

    def _migrate(self, timeout: float) -> None:
        try:
            with self._pool.connection() as conn:
                migrate(conn, self._shown)
        except psycopg.OperationalError as exc:
            self._raise_unreachable(exc, timeout)

    def _raise_unreachable(self, exc: psycopg.OperationalError, timeout: float) -> None:
        """At start-up, say why: the pool only knows it got no connection in time.

        libpq gives no SQLSTATE for a refused connection, so a bad password or a missing
        database is told apart from a server that is down by its message alone, for a person.
        """
        try:
            psycopg.connect(self._url, connect_timeout=max(1, math.ceil(timeout))).close()
        except psycopg.OperationalError as reason:
            raise DependencyTimeoutException(
                f"The metadata database {self._shown} is unreachable: {self._masked(reason)}"
            ) from None
        except psycopg.ProgrammingError as reason:  # libpq refused the URL's parameters
            raise ConfigError(f"metadata URL {self._shown}: {self._masked(reason)}") from None
        raise DependencyTimeoutException(
            f"The metadata database {self._shown} did not answer in time ({self._masked(exc)})"
        ) from exc

    def _masked(self, exc: BaseException) -> str:
        """An exception's first line with the URL and its password (if any) masked out."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        text = text.replace(self._url, self._shown)
        try:
            password = conninfo_to_dict(self._url).get("password")
        except psycopg.Error:  # a URL libpq cannot parse; its text is masked above already
            password = None
        return text.replace(str(password), "***") if password else text

    # -- connections and transactions ------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except psycopg.IntegrityError as exc:
            raise MetadataConflictError(
                f"the metadata database refused the change: {self._masked(exc)}"
            ) from exc
        except psycopg.OperationalError as exc:
            log.warning("metadata database %s unavailable: %s", self._shown, self._masked(exc))
            raise DependencyTimeoutException(_UNAVAILABLE) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataStoreClosedError(f"metadata store {self._shown} is closed")

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """A transaction holding WRITE_LOCK; nested calls join it via a SAVEPOINT."""
        self._check_open()
        state = self._local
        if state.conn is not None:
            with self._translated(), state.conn.transaction():
                yield
            return
        with self._translated(), self._pool.connection() as conn:
            state.conn = conn
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    yield
            finally:
                state.conn = None

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[DictRow]]:
        """Inside write(): this thread's transaction; outside: a pooled autocommit connection."""
        self._check_open()
        conn = self._local.conn
        with self._translated():
            if conn is not None:
                with conn.cursor(row_factory=dict_row) as cur:
                    yield cur
                return
            with self._pool.connection() as pooled, pooled.cursor(row_factory=dict_row) as cur:
                yield cur

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._cursor() as cur:
            cur.execute(_pyformat(sql), params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[DictRow]:
        with self._cursor() as cur:
            cur.execute(_pyformat(sql), params)
            return cur.fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> DictRow | None:
        with self._cursor() as cur:
            cur.execute(_pyformat(sql), params)
            return cur.fetchone()

    def hold_maintenance(self) -> bool:
        """A session-level advisory lock (`MAINTENANCE_LOCK`) on a connection of its own, outside
        the pool: PostgreSQL releases it when this process exits or the connection drops, so a
        dead holder is replaced at the next round of any other instance, with no clock or
        heartbeat involved. A connection found dead is replaced and the lock asked for again."""
        self._check_open()
        with self._maintenance_guard:
            conn = self._maintenance_conn
            if conn is not None:
                try:
                    conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    log.warning("lost the maintenance lock with its database connection")
                    conn.close()
                    self._maintenance_conn = conn = None
            try:
                conn = psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._connect_timeout,
                    application_name="hsmbridge-maintenance",
                )
            except psycopg.OperationalError as exc:
                log.warning("metadata database %s unavailable: %s", self._shown, self._masked(exc))
                raise DependencyTimeoutException(_UNAVAILABLE) from exc
            try:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK,))
                row = got.fetchone()
                held = bool(row and row[0])
            except psycopg.Error:
                conn.close()
                raise
            if not held:
                conn.close()
                return False
            log.info("this process now runs the once-per-database maintenance")
            self._maintenance_conn = conn
            return True

    def close(self) -> None:
        """Close the pool; call once, when no other thread uses the store."""
        self._closed = True
        with self._maintenance_guard:
            if self._maintenance_conn is not None:
                self._maintenance_conn.close()  # another instance may take maintenance now
                self._maintenance_conn = None
        self._pool.close()
