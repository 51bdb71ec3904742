"""The metadata schema, written once for every SQL engine, and the migration runner.

Owns: the append-only list of schema versions (`SCHEMA_VERSION` = its length), each as DDL with
the few column types the engines spell differently left as fields (`Dialect`), and `upgrade()`,
which brings a database to `SCHEMA_VERSION` inside a transaction the engine has opened under its
write lock. Version N is therefore the same tables, columns, keys and constraints on SQLite and
PostgreSQL: both enforce the same rules (primary keys, the unique store name, the foreign keys
and their ON DELETE actions).
Must not import a database driver, keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol


@dataclass(frozen=True)
class Dialect:
    """Column types that differ between engines."""

    text_key: str  # a text key that pages (`id > after ORDER BY id`) in byte order
    real: str
    blob: str
    flag: str  # a boolean


SQLITE: Final = Dialect(text_key="TEXT", real="REAL", blob="BLOB", flag="INTEGER")
# COLLATE "C": byte order, as SQLite's BINARY, whatever the database's default collation.
POSTGRESQL: Final = Dialect(
    text_key='TEXT COLLATE "C"', real="DOUBLE PRECISION", blob="BYTEA", flag="BOOLEAN"
)

_V1: Final = (
    """CREATE TABLE custom_key_stores (
        id {text_key} PRIMARY KEY,
        name {text_key} NOT NULL UNIQUE,
        cluster_id TEXT NOT NULL,
        trust_anchor_pem TEXT NOT NULL,
        connection_state TEXT NOT NULL,
        connection_error_code TEXT,
        store_type TEXT NOT NULL,
        creation_date {real} NOT NULL,
        password_blob {blob} NOT NULL
    )""",
    # RESTRICT: a store with keys cannot vanish underneath them, even by a bug.
    """CREATE TABLE keys (
        id {text_key} PRIMARY KEY,
        arn TEXT NOT NULL,
        account_id TEXT NOT NULL,
        region TEXT NOT NULL,
        custom_key_store_id {text_key} NOT NULL
            REFERENCES custom_key_stores(id) ON DELETE RESTRICT,
        cluster_id TEXT NOT NULL,
        description TEXT NOT NULL,
        base_state TEXT NOT NULL,
        creation_date {real} NOT NULL,
        policy TEXT NOT NULL,
        lifecycle TEXT NOT NULL,
        deletion_date {real},
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
        name {text_key} PRIMARY KEY,
        arn TEXT NOT NULL,
        key_id {text_key} NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        creation_date {real} NOT NULL,
        last_updated_date {real} NOT NULL
    )""",
    "CREATE INDEX aliases_by_key ON aliases(key_id)",
    """CREATE TABLE deleted_keys (
        key_id {text_key} PRIMARY KEY,
        arn TEXT NOT NULL,
        custom_key_store_id TEXT NOT NULL,
        cluster_id TEXT NOT NULL,
        deleted_at {real} NOT NULL,
        material_deleted {flag} NOT NULL
    )""",
    "CREATE INDEX deleted_keys_by_store ON deleted_keys(custom_key_store_id)",
)

# v2: grants. A grant dies with its key; the explicit delete in delete_key keeps that true with
# SQLite's foreign keys off too.
_V2: Final = (
    """CREATE TABLE grants (
        id {text_key} PRIMARY KEY,
        key_id {text_key} NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        key_arn TEXT NOT NULL,
        name TEXT NOT NULL,
        grantee_principal TEXT NOT NULL,
        retiring_principal TEXT,
        issuing_account TEXT NOT NULL,
        operations TEXT NOT NULL,
        constraints TEXT,
        creation_date {real} NOT NULL
    )""",
    "CREATE INDEX grants_by_key ON grants(key_id, id)",
    "CREATE INDEX grants_by_grantee ON grants(key_id, grantee_principal)",
    "CREATE INDEX grants_by_retiring ON grants(retiring_principal, id)",
)

# v3: kmsuser logins that failed in a row per store, counted across every process sharing the
# metadata, so hsmbridge stops before the HSM locks the crypto user (service/login_budget.py).
_V3: Final = ("ALTER TABLE custom_key_stores ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0",)

# v4: console sessions ended by sign-out, by their nonce, until they would have expired: every
# worker process and instance refuses a signed-out cookie (console/session.py).
_V4: Final = (
    """CREATE TABLE console_sign_outs (
        nonce {text_key} PRIMARY KEY,
        expires_at {real} NOT NULL
    )""",
    "CREATE INDEX console_sign_outs_by_expiry ON console_sign_outs(expires_at)",
)

# _VERSIONS[i] takes the schema from version i to version i + 1. Append only; never edit one that
# has shipped.
_VERSIONS: Final[tuple[tuple[str, ...], ...]] = (_V1, _V2, _V3, _V4)
SCHEMA_VERSION: Final = len(_VERSIONS)


def migrations(dialect: Dialect) -> tuple[tuple[str, ...], ...]:
    """Every version's statements in `dialect`'s types."""
    types = asdict(dialect)
    return tuple(tuple(sql.format(**types) for sql in version) for version in _VERSIONS)


class Executes(Protocol):
    """A sqlite3 or psycopg connection: execute() and a result to fetch from."""

    def execute(self, sql: Any, /) -> Any: ...


class NewerSchemaError(Exception):
    """The database was migrated by a newer hsmbridge."""


def upgrade(conn: Executes, statements: tuple[tuple[str, ...], ...]) -> int:
    """Apply the versions `conn`'s database lacks and record the new version; returns the version
    found. The caller holds the engine's write lock in an open transaction, so instances starting
    together migrate once, in turn, and a failed migration leaves nothing behind.

    Raises NewerSchemaError (nothing changed) for a database newer than this code.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    if current > len(statements):
        raise NewerSchemaError(current)
    for version in statements[current:]:
        for sql in version:
            conn.execute(sql)
    if current < len(statements):
        conn.execute("DELETE FROM schema_version")
        # An int from this module, never input: no placeholder style to agree on.
        conn.execute(f"INSERT INTO schema_version (version) VALUES ({len(statements):d})")  # noqa: S608
    return current


def newer_schema_message(shown: str, found: int) -> str:
    return (
        f"metadata database {shown} has schema version {found}, newer than this hsmbridge "
        f"supports ({SCHEMA_VERSION}); upgrade hsmbridge"
    )
