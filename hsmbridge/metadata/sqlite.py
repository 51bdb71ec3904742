"""SQLite implementation of the `MetadataStore` Protocol, safe across threads and processes.

Owns: the schema (custom_key_stores, keys, aliases, deleted_keys, schema_version), its
migrations, per-thread connections and the `write()` transaction. Enums are stored as their
string values and read back into the enum; tags are a JSON column of the key row.

Durability: WAL with `synchronous=FULL`. NORMAL can lose the last commits on power loss, and a
lost CreateKey row means an HSM key nobody can name while a client already holds its key id and
ciphertexts; metadata writes are rare next to crypto calls, so one extra fsync per commit is cheap.

Concurrency: one connection per thread (threading.local). `write()` takes SQLite's write lock up
front (`BEGIN IMMEDIATE`), so a check-then-act inside it is serialised against every other thread
and process; readers are never blocked (WAL). A nested `write()` joins the outer transaction
through a SAVEPOINT, so an exception inside it undoes only its own changes.

Must not import: hsmbridge.keystore, backend, service, api or cli.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from hsmbridge.errors import ConfigError, HsmbridgeError
from hsmbridge.metadata.store import DeletedKey, StoredKeyStore
from hsmbridge.model import (
    Alias,
    ConnectionErrorCode,
    ConnectionState,
    CustomKeyStore,
    CustomKeyStoreType,
    KeyLifecycle,
    KeyRecord,
    KeySpec,
    KeyState,
    KeyUsage,
    Origin,
    Tag,
)

BUSY_TIMEOUT_S: Final = 10.0

_SCHEMA_V1: Final = (
    """CREATE TABLE custom_key_stores (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        cluster_id TEXT NOT NULL,
        trust_anchor_pem TEXT NOT NULL,
        connection_state TEXT NOT NULL,
        connection_error_code TEXT,
        store_type TEXT NOT NULL,
        creation_date REAL NOT NULL,
        password_blob BLOB NOT NULL
    )""",
    # RESTRICT: a store with keys cannot vanish underneath them (spec §4.6), even by a bug.
    """CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        arn TEXT NOT NULL,
        account_id TEXT NOT NULL,
        region TEXT NOT NULL,
        custom_key_store_id TEXT NOT NULL
            REFERENCES custom_key_stores(id) ON DELETE RESTRICT,
        cluster_id TEXT NOT NULL,
        description TEXT NOT NULL,
        base_state TEXT NOT NULL,
        creation_date REAL NOT NULL,
        policy TEXT NOT NULL,
        lifecycle TEXT NOT NULL,
        deletion_date REAL,
        pending_window_days INTEGER,
        key_usage TEXT NOT NULL,
        key_spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        tags TEXT NOT NULL
    )""",
    "CREATE INDEX keys_by_store ON keys(custom_key_store_id)",
    "CREATE INDEX keys_by_deletion ON keys(base_state, deletion_date)",  # deletion sweeper
    "CREATE INDEX keys_by_lifecycle ON keys(lifecycle, id)",  # list_keys, DELETING rows
    """CREATE TABLE aliases (
        name TEXT PRIMARY KEY,
        arn TEXT NOT NULL,
        key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        creation_date REAL NOT NULL,
        last_updated_date REAL NOT NULL
    )""",
    "CREATE INDEX aliases_by_key ON aliases(key_id)",
    """CREATE TABLE deleted_keys (
        key_id TEXT PRIMARY KEY,
        arn TEXT NOT NULL,
        custom_key_store_id TEXT NOT NULL,
        cluster_id TEXT NOT NULL,
        deleted_at REAL NOT NULL,
        material_deleted INTEGER NOT NULL
    )""",
    "CREATE INDEX deleted_keys_by_store ON deleted_keys(custom_key_store_id)",
)


def _statements(statements: Sequence[str]) -> Callable[[sqlite3.Connection], None]:
    def migrate(conn: sqlite3.Connection) -> None:
        # One execute() per statement: executescript() would COMMIT our open transaction.
        for sql in statements:
            conn.execute(sql)

    return migrate


# MIGRATIONS[i] takes the schema from version i to version i + 1. Append only; never edit one
# that has shipped. A migration runs inside the BEGIN IMMEDIATE that also bumps the version.
MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (_statements(_SCHEMA_V1),)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class MetadataStoreClosedError(HsmbridgeError):
    """The store was used after close()."""


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
        _create_private_file(self.path)
        try:
            _migrate(self._conn(), self.path)
        except BaseException:
            self.close()
            raise
        _restrict_sidecars(self.path)

    def __repr__(self) -> str:
        return f"SqliteMetadataStore({str(self.path)!r})"

    # -- connections and transactions ------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise MetadataStoreClosedError(f"metadata store {self.path} is closed")
        conn = self._local.conn
        if conn is None:
            conn = _open(self.path)
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """BEGIN IMMEDIATE on this thread's connection; nested calls join it via a SAVEPOINT."""
        conn = self._conn()
        state = self._local
        if state.depth:
            yield from self._nested(conn, state)
            return
        conn.execute("BEGIN IMMEDIATE")
        state.depth = 1
        try:
            yield
        except BaseException:
            _rollback(conn)
            raise
        else:
            try:
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
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
        self._conn().execute(
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
        row = self._one("SELECT * FROM custom_key_stores WHERE id = ?", (store_id,))
        return _to_key_store(row) if row else None

    def get_key_store_by_name(self, name: str) -> StoredKeyStore | None:
        row = self._one("SELECT * FROM custom_key_stores WHERE name = ?", (name,))
        return _to_key_store(row) if row else None

    def list_key_stores(self, limit: int, after: str | None) -> list[StoredKeyStore]:
        rows = self._rows(
            "SELECT * FROM custom_key_stores WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit),
        )
        return [_to_key_store(r) for r in rows]

    def count_key_stores(self) -> int:
        return self._count("SELECT count(*) FROM custom_key_stores")

    def delete_key_store(self, store_id: str) -> None:
        self._conn().execute("DELETE FROM custom_key_stores WHERE id = ?", (store_id,))

    # -- keys --------------------------------------------------------------------------------

    def put_key(self, record: KeyRecord) -> None:
        values = _key_values(record)
        columns = ", ".join(values)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values if c != "id")
        self._conn().execute(
            f"INSERT INTO keys ({columns}) VALUES ({', '.join('?' * len(values))}) "  # noqa: S608 - column names are constants
            f"ON CONFLICT(id) DO UPDATE SET {updates}",
            tuple(values.values()),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._one("SELECT * FROM keys WHERE id = ?", (key_id,))
        return _to_key(row) if row else None

    def list_keys(self, limit: int, after: str | None) -> list[KeyRecord]:
        rows = self._rows(
            "SELECT * FROM keys WHERE lifecycle = ? AND id > ? ORDER BY id LIMIT ?",
            (KeyLifecycle.LIVE.value, after or "", limit),
        )
        return [_to_key(r) for r in rows]

    def keys_in_store(
        self, store_id: str, lifecycle: KeyLifecycle | None = None
    ) -> list[KeyRecord]:
        params: tuple[str, ...]
        if lifecycle is None:
            sql, params = "SELECT * FROM keys WHERE custom_key_store_id = ?", (store_id,)
        else:
            sql = "SELECT * FROM keys WHERE custom_key_store_id = ? AND lifecycle = ?"
            params = (store_id, lifecycle.value)
        return [_to_key(r) for r in self._rows(sql + " ORDER BY id", params)]

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
        return [_to_key(r) for r in rows]

    def delete_key(self, key_id: str) -> None:
        # Explicit alias delete (not only the FK cascade) so the rule holds even if someone
        # opens the file with foreign keys off.
        with self.write():
            conn = self._conn()
            conn.execute("DELETE FROM aliases WHERE key_id = ?", (key_id,))
            conn.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    # -- aliases -----------------------------------------------------------------------------

    def put_alias(self, alias: Alias) -> None:
        self._conn().execute(
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
        return _to_alias(row) if row else None

    def delete_alias(self, name: str) -> None:
        self._conn().execute("DELETE FROM aliases WHERE name = ?", (name,))

    def list_aliases(self, key_id: str | None, limit: int, after: str | None) -> list[Alias]:
        if key_id is None:
            sql, params = "SELECT * FROM aliases WHERE name > ?", [after or ""]
        else:
            sql, params = (
                "SELECT * FROM aliases WHERE key_id = ? AND name > ?",
                [key_id, after or ""],
            )
        rows = self._rows(sql + " ORDER BY name LIMIT ?", [*params, limit])
        return [_to_alias(r) for r in rows]

    def count_aliases(self, key_id: str) -> int:
        return self._count("SELECT count(*) FROM aliases WHERE key_id = ?", (key_id,))

    # -- tombstones --------------------------------------------------------------------------

    def record_deleted_key(self, tomb: DeletedKey) -> None:
        self._conn().execute(
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
        return iter([_to_deleted_key(r) for r in rows])


# --- opening, permissions, migrations ------------------------------------------------------------


def _create_private_file(path: Path) -> None:
    """Create the database file as 0600 before SQLite does (SQLite would honour the umask)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"metadata database {path} cannot be opened: {exc.strerror}") from None
    try:
        # An existing file may predate this rule; it holds sealed passwords, so tighten it.
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _restrict_sidecars(path: Path) -> None:
    # SQLite gives -wal/-shm the main file's mode; chmod anyway in case they predate it.
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def _open(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit BEGINs; write() issues BEGIN IMMEDIATE itself and reads
    # outside it autocommit. check_same_thread=False only so close() may close every thread's
    # connection; each connection is otherwise used by its own thread alone.
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # serialises two processes migrating the same file
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"metadata database {path} has schema version {current}, newer than this "
                f"hsmbridge supports ({SCHEMA_VERSION}); upgrade hsmbridge"
            )
        for version in range(current, SCHEMA_VERSION):
            MIGRATIONS[version](conn)
        if current < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (disk full, I/O); a second ROLLBACK would
    # then fail and hide the original exception.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


# --- row <-> record ----------------------------------------------------------------------------


def _to_key_store(row: sqlite3.Row) -> StoredKeyStore:
    code = row["connection_error_code"]
    store = CustomKeyStore(
        store_id=row["id"],
        name=row["name"],
        cluster_id=row["cluster_id"],
        trust_anchor_pem=row["trust_anchor_pem"],
        connection_state=ConnectionState(row["connection_state"]),
        creation_date=row["creation_date"],
        connection_error_code=ConnectionErrorCode(code) if code is not None else None,
        store_type=CustomKeyStoreType(row["store_type"]),
    )
    return StoredKeyStore(store=store, password_blob=bytes(row["password_blob"]))


def _key_values(r: KeyRecord) -> dict[str, Any]:
    return {
        "id": r.key_id,
        "arn": r.arn,
        "account_id": r.account_id,
        "region": r.region,
        "custom_key_store_id": r.custom_key_store_id,
        "cluster_id": r.cluster_id,
        "description": r.description,
        "base_state": r.base_state.value,
        "creation_date": r.creation_date,
        "policy": r.policy,
        "lifecycle": r.lifecycle.value,
        "deletion_date": r.deletion_date,
        "pending_window_days": r.pending_window_days,
        "key_usage": r.key_usage.value,
        "key_spec": r.key_spec.value,
        "origin": r.origin.value,
        # a list of pairs keeps the caller's tag order
        "tags": json.dumps([[t.key, t.value] for t in r.tags]),
    }


def _to_key(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["id"],
        arn=row["arn"],
        account_id=row["account_id"],
        region=row["region"],
        custom_key_store_id=row["custom_key_store_id"],
        cluster_id=row["cluster_id"],
        description=row["description"],
        base_state=KeyState(row["base_state"]),
        creation_date=row["creation_date"],
        policy=row["policy"],
        lifecycle=KeyLifecycle(row["lifecycle"]),
        deletion_date=row["deletion_date"],
        pending_window_days=row["pending_window_days"],
        key_usage=KeyUsage(row["key_usage"]),
        key_spec=KeySpec(row["key_spec"]),
        origin=Origin(row["origin"]),
        tags=tuple(Tag(k, v) for k, v in json.loads(row["tags"])),
    )


def _to_alias(row: sqlite3.Row) -> Alias:
    return Alias(
        name=row["name"],
        arn=row["arn"],
        target_key_id=row["key_id"],
        creation_date=row["creation_date"],
        last_updated_date=row["last_updated_date"],
    )


def _to_deleted_key(row: sqlite3.Row) -> DeletedKey:
    return DeletedKey(
        key_id=row["key_id"],
        arn=row["arn"],
        custom_key_store_id=row["custom_key_store_id"],
        cluster_id=row["cluster_id"],
        deleted_at=row["deleted_at"],
        material_deleted=bool(row["material_deleted"]),
    )
