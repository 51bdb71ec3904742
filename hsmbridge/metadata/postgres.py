"""PostgreSQL implementation of the `MetadataStore` Protocol, for several hsmbridge instances
sharing one database.

Owns: the connection pool, the `write()` transaction, error translation and the queries. The
schema, its migrations and the write lock live in `metadata.postgres_schema`, the row <-> record
mapping in `metadata.rows` (shared with SQLite).

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
from hsmbridge.metadata import rows as mapping
from hsmbridge.metadata.postgres_schema import WRITE_LOCK, migrate
from hsmbridge.metadata.store import (
    DeletedKey,
    MetadataConflictError,
    MetadataStoreClosedError,
    StoredKeyStore,
)
from hsmbridge.model import Alias, Grant, KeyLifecycle, KeyRecord, KeyState

log = logging.getLogger(__name__)

POOL_TIMEOUT_S: Final = 5.0  # fail fast while the database is down
POOL_MAX_CONNECTIONS: Final = 16  # per process; a server worker has fewer request threads
# How long one background reconnection keeps retrying (with backoff) before it gives up and the
# next request starts a fresh one: bounds how late the pool notices the database is back.
_RECONNECT_TIMEOUT_S: Final = 10.0
_UNAVAILABLE: Final = "The metadata database did not answer in time. Try again."


class _ThreadState(threading.local):
    conn: psycopg.Connection[Any] | None = None  # this thread's write() transaction


class PostgresMetadataStore:
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
            cur.execute(sql, params)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[DictRow]:
        with self._cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> DictRow | None:
        with self._cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        row = self._one(sql, params)
        return int(next(iter(row.values()))) if row else 0

    def close(self) -> None:
        """Close the pool; call once, when no other thread uses the store."""
        self._closed = True
        self._pool.close()

    # -- custom key stores -------------------------------------------------------------------

    def put_key_store(self, row: StoredKeyStore) -> None:
        s = row.store
        self._exec(
            """INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor_pem,
                   connection_state, connection_error_code, store_type, creation_date,
                   password_blob)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT(id) DO UPDATE SET name = excluded.name,
                   cluster_id = excluded.cluster_id, trust_anchor_pem = excluded.trust_anchor_pem,
                   connection_state = excluded.connection_state,
                   connection_error_code = excluded.connection_error_code,
                   store_type = excluded.store_type, creation_date = excluded.creation_date,
                   password_blob = excluded.password_blob""",
            (
                s.store_id,
                s.name,
                s.cluster_id,
                s.trust_anchor_pem,
                s.connection_state.value,
                s.connection_error_code.value if s.connection_error_code else None,
                s.store_type.value,
                s.creation_date,
                row.password_blob,
            ),
        )

    def get_key_store(self, store_id: str) -> StoredKeyStore | None:
        row = self._one("SELECT * FROM custom_key_stores WHERE id = %s", (store_id,))
        return mapping.to_key_store(row) if row else None

    def get_key_store_by_name(self, name: str) -> StoredKeyStore | None:
        row = self._one("SELECT * FROM custom_key_stores WHERE name = %s", (name,))
        return mapping.to_key_store(row) if row else None

    def list_key_stores(self, limit: int, after: str | None) -> list[StoredKeyStore]:
        rows = self._rows(
            "SELECT * FROM custom_key_stores WHERE id > %s ORDER BY id LIMIT %s",
            (after or "", limit),
        )
        return [mapping.to_key_store(r) for r in rows]

    def count_key_stores(self) -> int:
        return self._count("SELECT count(*) FROM custom_key_stores")

    def delete_key_store(self, store_id: str) -> None:
        self._exec("DELETE FROM custom_key_stores WHERE id = %s", (store_id,))

    def failed_logins(self, store_id: str) -> int:
        return self._count("SELECT failed_logins FROM custom_key_stores WHERE id = %s", (store_id,))

    def set_failed_logins(self, store_id: str, count: int) -> None:
        self._exec(
            "UPDATE custom_key_stores SET failed_logins = %s WHERE id = %s", (count, store_id)
        )

    # -- keys --------------------------------------------------------------------------------

    def put_key(self, record: KeyRecord) -> None:
        values = mapping.key_values(record)
        columns = ", ".join(values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != "id")
        self._exec(
            f"INSERT INTO keys ({columns}) VALUES ({', '.join(['%s'] * len(values))}) "  # noqa: S608 - column names are constants
            f"ON CONFLICT(id) DO UPDATE SET {updates}",
            tuple(values.values()),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM keys WHERE id = %s", (key_id,))
        return mapping.to_key(row) if row else None

    def list_keys(self, limit: int, after: str | None) -> list[KeyRecord]:
        rows = self._rows(
            "SELECT * FROM keys WHERE lifecycle = %s AND id > %s ORDER BY id LIMIT %s",
            (KeyLifecycle.LIVE.value, after or "", limit),
        )
        return [mapping.to_key(r) for r in rows]

    def keys_in_store(
        self, store_id: str, lifecycle: KeyLifecycle | None = None
    ) -> list[KeyRecord]:
        params: tuple[str, ...]
        if lifecycle is None:
            sql, params = "SELECT * FROM keys WHERE custom_key_store_id = %s", (store_id,)
        else:
            sql = "SELECT * FROM keys WHERE custom_key_store_id = %s AND lifecycle = %s"
            params = (store_id, lifecycle.value)
        return [mapping.to_key(r) for r in self._rows(sql + " ORDER BY id", params)]

    def count_keys_in_store(self, store_id: str) -> int:
        return self._count("SELECT count(*) FROM keys WHERE custom_key_store_id = %s", (store_id,))

    def keys_due_for_deletion(self, now: float) -> list[KeyRecord]:
        rows = self._rows(
            """SELECT * FROM keys
               WHERE (base_state = %s AND deletion_date <= %s AND lifecycle = %s)
                  OR lifecycle = %s
               ORDER BY id""",
            (
                KeyState.PENDING_DELETION.value,
                now,
                KeyLifecycle.LIVE.value,
                KeyLifecycle.DELETING.value,
            ),
        )
        return [mapping.to_key(r) for r in rows]

    def delete_key(self, key_id: str) -> None:
        # Aliases and grants explicitly, as SQLite does, not only through ON DELETE CASCADE.
        with self.write(), self._cursor() as cur:
            cur.execute("DELETE FROM aliases WHERE key_id = %s", (key_id,))
            cur.execute("DELETE FROM grants WHERE key_id = %s", (key_id,))
            cur.execute("DELETE FROM keys WHERE id = %s", (key_id,))

    # -- aliases -----------------------------------------------------------------------------

    def put_alias(self, alias: Alias) -> None:
        self._exec(
            """INSERT INTO aliases (name, arn, key_id, creation_date, last_updated_date)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT(name) DO UPDATE SET arn = excluded.arn, key_id = excluded.key_id,
                   creation_date = excluded.creation_date,
                   last_updated_date = excluded.last_updated_date""",
            (
                alias.name,
                alias.arn,
                alias.target_key_id,
                alias.creation_date,
                alias.last_updated_date,
            ),
        )

    def get_alias(self, name: str) -> Alias | None:
        row = self._one("SELECT * FROM aliases WHERE name = %s", (name,))
        return mapping.to_alias(row) if row else None

    def delete_alias(self, name: str) -> None:
        self._exec("DELETE FROM aliases WHERE name = %s", (name,))

    def list_aliases(self, key_id: str | None, limit: int, after: str | None) -> list[Alias]:
        if key_id is None:
            sql, params = "SELECT * FROM aliases WHERE name > %s", [after or ""]
        else:
            sql, params = (
                "SELECT * FROM aliases WHERE key_id = %s AND name > %s",
                [key_id, after or ""],
            )
        rows = self._rows(sql + " ORDER BY name LIMIT %s", [*params, limit])
        return [mapping.to_alias(r) for r in rows]

    def count_aliases(self, key_id: str) -> int:
        return self._count("SELECT count(*) FROM aliases WHERE key_id = %s", (key_id,))

    # -- grants ------------------------------------------------------------------------------

    def put_grant(self, grant: Grant) -> None:
        self._exec(
            """INSERT INTO grants (id, key_id, key_arn, name, grantee_principal,
                   retiring_principal, issuing_account, operations, constraints, creation_date)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT(id) DO UPDATE SET key_id = excluded.key_id,
                   key_arn = excluded.key_arn, name = excluded.name,
                   grantee_principal = excluded.grantee_principal,
                   retiring_principal = excluded.retiring_principal,
                   issuing_account = excluded.issuing_account,
                   operations = excluded.operations, constraints = excluded.constraints,
                   creation_date = excluded.creation_date""",
            mapping.grant_params(grant),
        )

    def get_grant(self, grant_id: str) -> Grant | None:
        row = self._one("SELECT * FROM grants WHERE id = %s", (grant_id,))
        return mapping.to_grant(row) if row else None

    def delete_grant(self, grant_id: str) -> None:
        self._exec("DELETE FROM grants WHERE id = %s", (grant_id,))

    def list_grants(
        self, key_id: str, limit: int, after: str | None, *, grantee: str | None = None
    ) -> list[Grant]:
        sql, params = "SELECT * FROM grants WHERE key_id = %s AND id > %s", [key_id, after or ""]
        if grantee is not None:
            sql, params = sql + " AND grantee_principal = %s", [*params, grantee]
        rows = self._rows(sql + " ORDER BY id LIMIT %s", [*params, limit])
        return [mapping.to_grant(r) for r in rows]

    def grants_for(self, key_id: str, grantees: tuple[str, ...]) -> list[Grant]:
        if not grantees:
            return []
        rows = self._rows(
            "SELECT * FROM grants WHERE key_id = %s AND grantee_principal = ANY(%s) ORDER BY id",
            (key_id, list(grantees)),
        )
        return [mapping.to_grant(r) for r in rows]

    def grants_named(self, key_id: str, name: str) -> list[Grant]:
        rows = self._rows(
            "SELECT * FROM grants WHERE key_id = %s AND name = %s ORDER BY id", (key_id, name)
        )
        return [mapping.to_grant(r) for r in rows]

    def count_grants(self, key_id: str) -> int:
        return self._count("SELECT count(*) FROM grants WHERE key_id = %s", (key_id,))

    def retirable_grants(
        self, retiring_principal: str, limit: int, after: str | None
    ) -> list[Grant]:
        rows = self._rows(
            "SELECT * FROM grants WHERE retiring_principal = %s AND id > %s ORDER BY id LIMIT %s",
            (retiring_principal, after or "", limit),
        )
        return [mapping.to_grant(r) for r in rows]

    # -- tombstones --------------------------------------------------------------------------

    def record_deleted_key(self, tomb: DeletedKey) -> None:
        self._exec(
            """INSERT INTO deleted_keys
               (key_id, arn, custom_key_store_id, cluster_id, deleted_at, material_deleted)
               VALUES (%s, %s, %s, %s, %s, %s)
               ON CONFLICT(key_id) DO UPDATE SET arn = excluded.arn,
                   custom_key_store_id = excluded.custom_key_store_id,
                   cluster_id = excluded.cluster_id, deleted_at = excluded.deleted_at,
                   material_deleted = excluded.material_deleted""",
            (
                tomb.key_id,
                tomb.arn,
                tomb.custom_key_store_id,
                tomb.cluster_id,
                tomb.deleted_at,
                tomb.material_deleted,
            ),
        )

    def deleted_keys(self, store_id: str | None = None) -> Iterator[DeletedKey]:
        if store_id is None:
            rows = self._rows("SELECT * FROM deleted_keys ORDER BY deleted_at, key_id")
        else:
            rows = self._rows(
                "SELECT * FROM deleted_keys WHERE custom_key_store_id = %s "
                "ORDER BY deleted_at, key_id",
                (store_id,),
            )
        return iter([mapping.to_deleted_key(r) for r in rows])
