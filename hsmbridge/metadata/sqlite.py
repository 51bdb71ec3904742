"""SQLite implementation of the `MetadataStore` Protocol, safe across threads and processes.

Owns: per-thread connections, the `write()` transaction and the queries. The schema and its
migrations live in `metadata.schema`, the row <-> record mapping in `metadata.rows`.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hsmbridge.errors import DependencyTimeoutException
from hsmbridge.metadata import rows as mapping
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
    DeletedKey,
    MetadataConflictError,
    MetadataStoreClosedError,
    StoredKeyStore,
)
from hsmbridge.model import Alias, Grant, KeyLifecycle, KeyRecord, KeyState

__all__ = [
    "BUSY_TIMEOUT_S",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "MetadataStoreClosedError",
    "SqliteMetadataStore",
]


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


class SqliteMetadataStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = _ThreadState()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # The hot path reads one key row and one store row per cryptographic request.
        self._key_cache: ReadCache[KeyRecord | None] = ReadCache(self._data_version)
        self._store_cache: ReadCache[StoredKeyStore | None] = ReadCache(self._data_version)
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
                self._key_cache.bump()
                self._store_cache.bump()
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
            self._key_cache.bump()
            self._store_cache.bump()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn().execute(sql, params).fetchone()
        return row

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        row = self._one(sql, params)
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        """Close every thread's connection; call once, when no other thread uses the store."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local.conn = None

    # -- custom key stores -------------------------------------------------------------------

    def put_key_store(self, row: StoredKeyStore) -> None:
        s = row.store
        self._exec(
            """INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor_pem,
                   connection_state, connection_error_code, store_type, creation_date,
                   password_blob)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
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
        def load() -> StoredKeyStore | None:
            row = self._one("SELECT * FROM custom_key_stores WHERE id = ?", (store_id,))
            return mapping.to_key_store(row) if row else None

        if self._local.depth:  # inside write(): read this transaction's own view
            return load()
        return self._store_cache.get(store_id, load)

    def get_key_store_by_name(self, name: str) -> StoredKeyStore | None:
        row = self._one("SELECT * FROM custom_key_stores WHERE name = ?", (name,))
        return mapping.to_key_store(row) if row else None

    def list_key_stores(self, limit: int, after: str | None) -> list[StoredKeyStore]:
        rows = self._rows(
            "SELECT * FROM custom_key_stores WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit),
        )
        return [mapping.to_key_store(r) for r in rows]

    def count_key_stores(self) -> int:
        return self._count("SELECT count(*) FROM custom_key_stores")

    def delete_key_store(self, store_id: str) -> None:
        self._exec("DELETE FROM custom_key_stores WHERE id = ?", (store_id,))

    def failed_logins(self, store_id: str) -> int:
        # Never cached: the count is read to decide whether to call C_Login at all.
        return self._count("SELECT failed_logins FROM custom_key_stores WHERE id = ?", (store_id,))

    def set_failed_logins(self, store_id: str, count: int) -> None:
        self._exec("UPDATE custom_key_stores SET failed_logins = ? WHERE id = ?", (count, store_id))

    # -- keys --------------------------------------------------------------------------------

    def put_key(self, record: KeyRecord) -> None:
        values = mapping.key_values(record)
        columns = ", ".join(values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != "id")
        self._exec(
            f"INSERT INTO keys ({columns}) VALUES ({', '.join('?' * len(values))}) "  # noqa: S608 - column names are constants
            f"ON CONFLICT(id) DO UPDATE SET {updates}",
            tuple(values.values()),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        def load() -> KeyRecord | None:
            row = self._one("SELECT * FROM keys WHERE id = ?", (key_id,))
            return mapping.to_key(row) if row else None

        if self._local.depth:  # inside write(): read this transaction's own view
            return load()
        return self._key_cache.get(key_id, load)

    def list_keys(self, limit: int, after: str | None) -> list[KeyRecord]:
        rows = self._rows(
            "SELECT * FROM keys WHERE lifecycle = ? AND id > ? ORDER BY id LIMIT ?",
            (KeyLifecycle.LIVE.value, after or "", limit),
        )
        return [mapping.to_key(r) for r in rows]

    def keys_in_store(
        self, store_id: str, lifecycle: KeyLifecycle | None = None
    ) -> list[KeyRecord]:
        params: tuple[str, ...]
        if lifecycle is None:
            sql, params = "SELECT * FROM keys WHERE custom_key_store_id = ?", (store_id,)
        else:
            sql = "SELECT * FROM keys WHERE custom_key_store_id = ? AND lifecycle = ?"
            params = (store_id, lifecycle.value)
        return [mapping.to_key(r) for r in self._rows(sql + " ORDER BY id", params)]

    def count_keys_in_store(self, store_id: str) -> int:
        return self._count("SELECT count(*) FROM keys WHERE custom_key_store_id = ?", (store_id,))

    def keys_due_for_deletion(self, now: float) -> list[KeyRecord]:
        rows = self._rows(
            """SELECT * FROM keys
               WHERE (base_state = ? AND deletion_date <= ? AND lifecycle = ?)
                  OR lifecycle = ?
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
        # Explicit alias delete (not only the FK cascade) so the rule holds even if someone
        # opens the file with foreign keys off.
        with self.write():
            conn = self._conn()
            conn.execute("DELETE FROM aliases WHERE key_id = ?", (key_id,))
            conn.execute("DELETE FROM grants WHERE key_id = ?", (key_id,))
            conn.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    # -- aliases -----------------------------------------------------------------------------

    def put_alias(self, alias: Alias) -> None:
        self._exec(
            """INSERT INTO aliases (name, arn, key_id, creation_date, last_updated_date)
               VALUES (?, ?, ?, ?, ?)
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
        row = self._one("SELECT * FROM aliases WHERE name = ?", (name,))
        return mapping.to_alias(row) if row else None

    def delete_alias(self, name: str) -> None:
        self._exec("DELETE FROM aliases WHERE name = ?", (name,))

    def list_aliases(self, key_id: str | None, limit: int, after: str | None) -> list[Alias]:
        if key_id is None:
            sql, params = "SELECT * FROM aliases WHERE name > ?", [after or ""]
        else:
            sql, params = (
                "SELECT * FROM aliases WHERE key_id = ? AND name > ?",
                [key_id, after or ""],
            )
        rows = self._rows(sql + " ORDER BY name LIMIT ?", [*params, limit])
        return [mapping.to_alias(r) for r in rows]

    def count_aliases(self, key_id: str) -> int:
        return self._count("SELECT count(*) FROM aliases WHERE key_id = ?", (key_id,))

    # -- grants ------------------------------------------------------------------------------

    def put_grant(self, grant: Grant) -> None:
        self._exec(
            """INSERT OR REPLACE INTO grants (id, key_id, key_arn, name, grantee_principal,
                   retiring_principal, issuing_account, operations, constraints, creation_date)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            mapping.grant_params(grant),
        )

    def get_grant(self, grant_id: str) -> Grant | None:
        row = self._one("SELECT * FROM grants WHERE id = ?", (grant_id,))
        return mapping.to_grant(row) if row else None

    def delete_grant(self, grant_id: str) -> None:
        self._exec("DELETE FROM grants WHERE id = ?", (grant_id,))

    def list_grants(
        self, key_id: str, limit: int, after: str | None, *, grantee: str | None = None
    ) -> list[Grant]:
        sql, params = "SELECT * FROM grants WHERE key_id = ? AND id > ?", [key_id, after or ""]
        if grantee is not None:
            sql, params = sql + " AND grantee_principal = ?", [*params, grantee]
        rows = self._rows(sql + " ORDER BY id LIMIT ?", [*params, limit])
        return [mapping.to_grant(r) for r in rows]

    def grants_for(self, key_id: str, grantees: tuple[str, ...]) -> list[Grant]:
        if not grantees:
            return []
        marks = ",".join("?" * len(grantees))
        rows = self._rows(
            f"SELECT * FROM grants WHERE key_id = ? AND grantee_principal IN ({marks}) "  # noqa: S608 - placeholders only
            "ORDER BY id",
            (key_id, *grantees),
        )
        return [mapping.to_grant(r) for r in rows]

    def grants_named(self, key_id: str, name: str) -> list[Grant]:
        rows = self._rows(
            "SELECT * FROM grants WHERE key_id = ? AND name = ? ORDER BY id", (key_id, name)
        )
        return [mapping.to_grant(r) for r in rows]

    def count_grants(self, key_id: str) -> int:
        return self._count("SELECT count(*) FROM grants WHERE key_id = ?", (key_id,))

    def retirable_grants(
        self, retiring_principal: str, limit: int, after: str | None
    ) -> list[Grant]:
        rows = self._rows(
            "SELECT * FROM grants WHERE retiring_principal = ? AND id > ? ORDER BY id LIMIT ?",
            (retiring_principal, after or "", limit),
        )
        return [mapping.to_grant(r) for r in rows]

    # -- tombstones --------------------------------------------------------------------------

    def record_deleted_key(self, tomb: DeletedKey) -> None:
        self._exec(
            """INSERT OR REPLACE INTO deleted_keys
               (key_id, arn, custom_key_store_id, cluster_id, deleted_at, material_deleted)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (
                tomb.key_id,
                tomb.arn,
                tomb.custom_key_store_id,
                tomb.cluster_id,
                tomb.deleted_at,
                int(tomb.material_deleted),
            ),
        )

    def deleted_keys(self, store_id: str | None = None) -> Iterator[DeletedKey]:
        # Fetched eagerly: a lazy cursor would hold a read snapshot open for as long as the
        # caller iterates, on a connection other code on this thread is using.
        if store_id is None:
            rows = self._rows("SELECT * FROM deleted_keys ORDER BY deleted_at, key_id")
        else:
            rows = self._rows(
                "SELECT * FROM deleted_keys WHERE custom_key_store_id = ? "
                "ORDER BY deleted_at, key_id",
                (store_id,),
            )
        return iter([mapping.to_deleted_key(r) for r in rows])
