"""Opening the SQLite metadata file safely, and migrating it.

Owns: connection pragmas (WAL, synchronous=FULL, foreign keys, busy timeout), the 0600 file
rules, and `migrate()`: the shared schema (`metadata.ddl`) in SQLite's types, applied under
BEGIN IMMEDIATE.
Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Final

from hsmbridge.errors import ConfigError
from hsmbridge.metadata import ddl

BUSY_TIMEOUT_S: Final = 10.0

# MIGRATIONS[i] takes the schema from version i to version i + 1 (`metadata.ddl`).
MIGRATIONS: Final = ddl.migrations(ddl.SQLITE)
SCHEMA_VERSION: Final = ddl.SCHEMA_VERSION


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
    _enter_wal(conn)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _enter_wal(conn: sqlite3.Connection) -> None:
    # Switching a new file to WAL takes its exclusive lock from a shared one. When two
    # connections do that at once SQLite refuses one at once instead of calling the busy
    # handler (waiting could deadlock), so instances starting together retry here.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.005, 0.05))  # noqa: S311 (jitter, not a secret)


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION, or refuse one newer than this code. One execute() per
    statement: executescript() would COMMIT the open transaction."""
    conn.execute("BEGIN IMMEDIATE")  # serialises two processes migrating the same file
    try:
        ddl.upgrade(conn, MIGRATIONS)
        conn.execute("COMMIT")
    except ddl.NewerSchemaError as exc:
        rollback(conn)
        raise ConfigError(ddl.newer_schema_message(str(path), exc.args[0])) from None
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (disk full, I/O); a second ROLLBACK would
    # then fail and hide the original exception.
    if conn.in_transaction:
        conn.execute("ROLLBACK")
