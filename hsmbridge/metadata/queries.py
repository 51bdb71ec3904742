"""The metadata queries, written once for every SQL engine.

Owns: `SqlQueries`, the `MetadataStore` methods as SQL over the shared schema (`metadata.ddl`)
and the row mapping (`metadata.rows`). An engine subclasses it and supplies the five primitives
it stands on: `write()` (its transaction), `_exec`, `_rows` and `_one` (one statement, inside the
current `write()` or by itself), and `_cached` (a read cache, or none). Statements use `?`
placeholders and only SQL both SQLite and PostgreSQL accept (`INSERT ... ON CONFLICT (pk) DO
UPDATE`, `IN (?, ...)`); an engine with another placeholder style rewrites them in `_exec`.
Must not import a database driver, keystore, backend, service, protocol, http or cli.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from hsmbridge.metadata import rows as mapping
from hsmbridge.metadata.rows import Row
from hsmbridge.metadata.store import DeletedKey, StoredKeyStore
from hsmbridge.model import Alias, Grant, KeyLifecycle, KeyRecord, KeyState

T = TypeVar("T")


def upsert(table: str, key: str, columns: Sequence[str]) -> str:
    """INSERT, or UPDATE every other column of the row with the same primary key."""
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    marks = ", ".join("?" * len(columns))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) "  # noqa: S608 - constant names
        f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )


_STORE_COLUMNS = (
    "id",
    "name",
    "cluster_id",
    "trust_anchor_pem",
    "connection_state",
    "connection_error_code",
    "store_type",
    "creation_date",
    "password_blob",
)
_ALIAS_COLUMNS = ("name", "arn", "key_id", "creation_date", "last_updated_date")
_GRANT_COLUMNS = (
    "id",
    "key_id",
    "key_arn",
    "name",
    "grantee_principal",
    "retiring_principal",
    "issuing_account",
    "operations",
    "constraints",
    "creation_date",
)
_TOMB_COLUMNS = (
    "key_id",
    "arn",
    "custom_key_store_id",
    "cluster_id",
    "deleted_at",
    "material_deleted",
)
# put_key_store leaves failed_logins alone: state changes must not reset the login budget.
_PUT_STORE = upsert("custom_key_stores", "id", _STORE_COLUMNS)
_PUT_ALIAS = upsert("aliases", "name", _ALIAS_COLUMNS)
_PUT_GRANT = upsert("grants", "id", _GRANT_COLUMNS)
_PUT_TOMB = upsert("deleted_keys", "key_id", _TOMB_COLUMNS)
_PUT_SIGN_OUT = upsert("console_sign_outs", "nonce", ("nonce", "expires_at"))


class SqlQueries(ABC):
    """Every `MetadataStore` query, over the engine primitives below."""

    # -- engine primitives -----------------------------------------------------------------

    @abstractmethod
    def write(self) -> AbstractContextManager[None]:
        """The engine's serialised transaction; nested calls join the outer one."""

    @abstractmethod
    def _exec(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one change."""

    @abstractmethod
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        """Run one query; every row, each indexable by column name."""

    @abstractmethod
    def _one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """Run one query; its first row or None."""

    def _cached(self, table: str, key: str, load: Callable[[], T]) -> T:
        """A hot-path read (one key or store row per cryptographic request); an engine with a
        read cache that is never stale overrides this."""
        return load()

    def _count(self, sql: str, params: Sequence[Any] = ()) -> int:
        row = self._one(sql, params)  # `sql` names its single column n
        return int(row["n"]) if row is not None and row["n"] is not None else 0

    # -- custom key stores -------------------------------------------------------------------

    def put_key_store(self, row: StoredKeyStore) -> None:
        s = row.store
        self._exec(
            _PUT_STORE,
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

        return self._cached("custom_key_stores", store_id, load)

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
        return self._count("SELECT count(*) AS n FROM custom_key_stores")

    def delete_key_store(self, store_id: str) -> None:
        self._exec("DELETE FROM custom_key_stores WHERE id = ?", (store_id,))

    def failed_logins(self, store_id: str) -> int:
        # Never cached: the count is read to decide whether to call C_Login at all.
        return self._count(
            "SELECT failed_logins AS n FROM custom_key_stores WHERE id = ?", (store_id,)
        )

    def set_failed_logins(self, store_id: str, count: int) -> None:
        self._exec("UPDATE custom_key_stores SET failed_logins = ? WHERE id = ?", (count, store_id))

    # -- keys --------------------------------------------------------------------------------

    def put_key(self, record: KeyRecord) -> None:
        values = mapping.key_values(record)
        self._exec(upsert("keys", "id", tuple(values)), tuple(values.values()))

    def get_key(self, key_id: str) -> KeyRecord | None:
        def load() -> KeyRecord | None:
            row = self._one("SELECT * FROM keys WHERE id = ?", (key_id,))
            return mapping.to_key(row) if row else None

        return self._cached("keys", key_id, load)

    def list_keys(self, limit: int, after: str | None) -> list[KeyRecord]:
        rows = self._rows(
            "SELECT * FROM keys WHERE lifecycle = ? AND id > ? ORDER BY id LIMIT ?",
            (KeyLifecycle.LIVE.value, after or "", limit),
        )
        return [mapping.to_key(r) for r in rows]

    def keys_in_store(
        self, store_id: str, lifecycle: KeyLifecycle | None = None
    ) -> list[KeyRecord]:
        sql, params = "SELECT * FROM keys WHERE custom_key_store_id = ?", [store_id]
        if lifecycle is not None:
            sql, params = sql + " AND lifecycle = ?", [*params, lifecycle.value]
        return [mapping.to_key(r) for r in self._rows(sql + " ORDER BY id", params)]

    def count_keys_in_store(self, store_id: str) -> int:
        return self._count(
            "SELECT count(*) AS n FROM keys WHERE custom_key_store_id = ?", (store_id,)
        )

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
        # Aliases and grants explicitly, not only through ON DELETE CASCADE, so the rule holds
        # even in a SQLite file opened with foreign keys off.
        with self.write():
            self._exec("DELETE FROM aliases WHERE key_id = ?", (key_id,))
            self._exec("DELETE FROM grants WHERE key_id = ?", (key_id,))
            self._exec("DELETE FROM keys WHERE id = ?", (key_id,))

    # -- aliases -----------------------------------------------------------------------------

    def put_alias(self, alias: Alias) -> None:
        self._exec(
            _PUT_ALIAS,
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
        sql, params = "SELECT * FROM aliases WHERE name > ?", [after or ""]
        if key_id is not None:
            sql, params = sql + " AND key_id = ?", [*params, key_id]
        rows = self._rows(sql + " ORDER BY name LIMIT ?", [*params, limit])
        return [mapping.to_alias(r) for r in rows]

    def count_aliases(self, key_id: str) -> int:
        return self._count("SELECT count(*) AS n FROM aliases WHERE key_id = ?", (key_id,))

    # -- grants ------------------------------------------------------------------------------

    def put_grant(self, grant: Grant) -> None:
        self._exec(_PUT_GRANT, mapping.grant_params(grant))

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
        marks = ", ".join("?" * len(grantees))
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
        return self._count("SELECT count(*) AS n FROM grants WHERE key_id = ?", (key_id,))

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
            _PUT_TOMB,
            (
                tomb.key_id,
                tomb.arn,
                tomb.custom_key_store_id,
                tomb.cluster_id,
                tomb.deleted_at,
                tomb.material_deleted,  # a bool: SQLite stores 1/0, PostgreSQL a boolean
            ),
        )

    # -- console sign-outs -------------------------------------------------------------------

    def record_sign_out(self, nonce: str, expires_at: float, now: float) -> None:
        with self.write():
            self._exec("DELETE FROM console_sign_outs WHERE expires_at <= ?", (now,))
            self._exec(_PUT_SIGN_OUT, (nonce, expires_at))

    def signed_out(self, nonce: str) -> bool:
        # Never cached: another process may have ended the session a moment ago.
        return (
            self._one("SELECT 1 AS n FROM console_sign_outs WHERE nonce = ?", (nonce,)) is not None
        )

    def deleted_keys(self, store_id: str | None = None) -> Iterator[DeletedKey]:
        # Fetched eagerly: a lazy cursor would hold a read snapshot (or a pooled connection)
        # for as long as the caller iterates.
        sql, params = "SELECT * FROM deleted_keys", []
        if store_id is not None:
            sql, params = sql + " WHERE custom_key_store_id = ?", [store_id]
        rows = self._rows(sql + " ORDER BY deleted_at, key_id", params)
        return iter([mapping.to_deleted_key(r) for r in rows])
