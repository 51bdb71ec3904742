"""Migrating the PostgreSQL metadata database, and the lock that orders its changes.

Owns: `WRITE_LOCK`, the transaction-level advisory lock every `write()` and every migration takes
first (one writer at a time across every instance sharing the database), `MAINTENANCE_LOCK`
(see `PostgresMetadataStore.hold_maintenance`), and `migrate()`: the
shared schema (`metadata.ddl`) in PostgreSQL's types, applied under that lock.
Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from hsmbridge.errors import ConfigError
from hsmbridge.metadata import ddl

# Arbitrary 64-bit keys; "hsmb" in their high half keeps them recognisable in pg_locks.
WRITE_LOCK: Final = 0x68736D62_00000001
# Session-level, held by the one process that runs the once-per-database background work.
MAINTENANCE_LOCK: Final = 0x68736D62_00000002

# MIGRATIONS[i] takes the schema from version i to version i + 1 (`metadata.ddl`).
MIGRATIONS: Final = ddl.migrations(ddl.POSTGRESQL)
SCHEMA_VERSION: Final = ddl.SCHEMA_VERSION


def migrate(conn: psycopg.Connection[Any], shown_url: str) -> None:
    """Bring the database to SCHEMA_VERSION, or refuse one newer than this code.

    One transaction under WRITE_LOCK, so instances starting together migrate once, in turn, and
    DDL is all or nothing (PostgreSQL's DDL is transactional). `conn` is in autocommit mode.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            ddl.upgrade(conn, MIGRATIONS)
    except ddl.NewerSchemaError as exc:
        raise ConfigError(ddl.newer_schema_message(shown_url, exc.args[0])) from None
