"""The SQLite schema of the metadata store, its migrations, and opening the file safely.

Owns: the DDL, the append-only `MIGRATIONS` list (`SCHEMA_VERSION` = its length), connection
pragmas (WAL, synchronous=FULL, foreign keys, busy timeout) and the 0600 file rules.
Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from hsmbridge.errors import ConfigError

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
    # RESTRICT: a store with keys cannot vanish underneath them, even by a bug.
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


# v2: grants. A grant dies with its key; the explicit delete in delete_key keeps that
# true with foreign keys off too.
_SCHEMA_V2: Final = (
    """CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        key_arn TEXT NOT NULL,
        name TEXT NOT NULL,
        grantee_principal TEXT NOT NULL,
        retiring_principal TEXT,
        issuing_account TEXT NOT NULL,
        operations TEXT NOT NULL,
        constraints TEXT,
        creation_date REAL NOT NULL
    )""",
    "CREATE INDEX grants_by_key ON grants(key_id, id)",
    "CREATE INDEX grants_by_grantee ON grants(key_id, grantee_principal)",
    "CREATE INDEX grants_by_retiring ON grants(retiring_principal, id)",
)


# v3: kmsuser logins that failed in a row per store, counted across every process sharing the
# metadata, so hsmbridge stops before the HSM locks the crypto user (service/login_budget.py).
_SCHEMA_V3: Final = (
    "ALTER TABLE custom_key_stores ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0",
)


def _statements(statements: Sequence[str]) -> Callable[[sqlite3.Connection], None]:
    def migrate(conn: sqlite3.Connection) -> None:
        # One execute() per statement: executescript() would COMMIT our open transaction.
        for sql in statements:
            conn.execute(sql)

    return migrate


# MIGRATIONS[i] takes the schema from version i to version i + 1. Append only; never edit one
# that has shipped. A migration runs inside the BEGIN IMMEDIATE that also bumps the version.
MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _statements(_SCHEMA_V1),
    _statements(_SCHEMA_V2),
    _statements(_SCHEMA_V3),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def create_private_file(path: Path) -> None:
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


def restrict_sidecars(path: Path) -> None:
    # SQLite gives -wal/-shm the main file's mode; chmod anyway in case they predate it.
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


def open_connection(path: Path) -> sqlite3.Connection:
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


def migrate(conn: sqlite3.Connection, path: Path) -> None:
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
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (disk full, I/O); a second ROLLBACK would
    # then fail and hide the original exception.
    if conn.in_transaction:
        conn.execute("ROLLBACK")
