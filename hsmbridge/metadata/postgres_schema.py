"""The PostgreSQL schema of the metadata store, its migrations, and the lock that orders changes.

Owns: the DDL, the append-only `MIGRATIONS` list and `migrate()`. Version N here is the same
logical schema as SQLite's version N (`metadata.schema`): the same tables, columns, keys and
constraints, so both engines enforce the same rules (primary keys, the unique store name, the
foreign keys and their ON DELETE actions). Text keys that page (`id > after ORDER BY id`) are
`COLLATE "C"`: byte order, as SQLite's BINARY, whatever the database's default collation.

`WRITE_LOCK` is the transaction-level advisory lock every `write()` and every migration takes
first: one writer at a time across every instance sharing the database.
Must not import: hsmbridge.keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg

from hsmbridge.errors import ConfigError

# An arbitrary 64-bit key; "hsmb" in its high half keeps it recognisable in pg_locks.
WRITE_LOCK: Final = 0x68736D62_00000001

_TEXT_KEY: Final = 'TEXT COLLATE "C"'

_SCHEMA_V1: Final = (
    f"""CREATE TABLE custom_key_stores (
        id {_TEXT_KEY} PRIMARY KEY,
        name {_TEXT_KEY} NOT NULL UNIQUE,
        cluster_id TEXT NOT NULL,
        trust_anchor_pem TEXT NOT NULL,
        connection_state TEXT NOT NULL,
        connection_error_code TEXT,
        store_type TEXT NOT NULL,
        creation_date DOUBLE PRECISION NOT NULL,
        password_blob BYTEA NOT NULL
    )""",
    # RESTRICT: a store with keys cannot vanish underneath them, even by a bug.
    f"""CREATE TABLE keys (
        id {_TEXT_KEY} PRIMARY KEY,
        arn TEXT NOT NULL,
        account_id TEXT NOT NULL,
        region TEXT NOT NULL,
        custom_key_store_id {_TEXT_KEY} NOT NULL
            REFERENCES custom_key_stores(id) ON DELETE RESTRICT,
        cluster_id TEXT NOT NULL,
        description TEXT NOT NULL,
        base_state TEXT NOT NULL,
        creation_date DOUBLE PRECISION NOT NULL,
        policy TEXT NOT NULL,
        lifecycle TEXT NOT NULL,
        deletion_date DOUBLE PRECISION,
        pending_window_days INTEGER,
        key_usage TEXT NOT NULL,
        key_spec TEXT NOT NULL,
        origin TEXT NOT NULL,
        tags TEXT NOT NULL
    )""",
    "CREATE INDEX keys_by_store ON keys(custom_key_store_id)",
    "CREATE INDEX keys_by_deletion ON keys(base_state, deletion_date)",
    "CREATE INDEX keys_by_lifecycle ON keys(lifecycle, id)",
    f"""CREATE TABLE aliases (
        name {_TEXT_KEY} PRIMARY KEY,
        arn TEXT NOT NULL,
        key_id {_TEXT_KEY} NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        creation_date DOUBLE PRECISION NOT NULL,
        last_updated_date DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX aliases_by_key ON aliases(key_id, name)",
    f"""CREATE TABLE deleted_keys (
        key_id {_TEXT_KEY} PRIMARY KEY,
        arn TEXT NOT NULL,
        custom_key_store_id TEXT NOT NULL,
        cluster_id TEXT NOT NULL,
        deleted_at DOUBLE PRECISION NOT NULL,
        material_deleted BOOLEAN NOT NULL
    )""",
    "CREATE INDEX deleted_keys_by_store ON deleted_keys(custom_key_store_id)",
)

_SCHEMA_V2: Final = (
    f"""CREATE TABLE grants (
        id {_TEXT_KEY} PRIMARY KEY,
        key_id {_TEXT_KEY} NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        key_arn TEXT NOT NULL,
        name TEXT NOT NULL,
        grantee_principal TEXT NOT NULL,
        retiring_principal TEXT,
        issuing_account TEXT NOT NULL,
        operations TEXT NOT NULL,
        constraints TEXT,
        creation_date DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX grants_by_key ON grants(key_id, id)",
    "CREATE INDEX grants_by_grantee ON grants(key_id, grantee_principal)",
    "CREATE INDEX grants_by_retiring ON grants(retiring_principal, id)",
)

_SCHEMA_V3: Final = (
    "ALTER TABLE custom_key_stores ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0",
)

# MIGRATIONS[i] takes the schema from version i to version i + 1. Append only; never edit one
# that has shipped; keep in step with SQLite's list (a test checks the lengths match).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(conn: psycopg.Connection[Any], shown_url: str) -> None:
    """Bring the database to SCHEMA_VERSION, or refuse one newer than this code.

    One transaction under WRITE_LOCK, so instances starting together migrate once, in turn, and
    DDL is all or nothing (PostgreSQL's DDL is transactional). `conn` is in autocommit mode.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"metadata database {shown_url} has schema version {current}, newer than this "
                f"hsmbridge supports ({SCHEMA_VERSION}); upgrade hsmbridge"
            )
        for version in range(current, SCHEMA_VERSION):
            for sql in MIGRATIONS[version]:
                conn.execute(sql)
        if current < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
