"""The metadata seam: where key stores, keys, aliases and deletion tombstones are recorded.

Owns: the `MetadataStore` Protocol and the records only metadata needs. Writes that read, check
and change state happen inside `with store.write():`, one serialised transaction (across threads,
processes and instances sharing the database), so every check-then-act in the service is atomic.
Reads outside `write()` see the last committed state. A database that cannot be reached in time is
a `DependencyTimeoutException` (retryable); a change the schema refuses, `MetadataConflictError`.
Must not import backend, keystore or anything above.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from hsmbridge.errors import HsmbridgeError
from hsmbridge.model import Alias, CustomKeyStore, Grant, KeyLifecycle, KeyRecord


class MetadataStoreClosedError(HsmbridgeError):
    """The store was used after close()."""


class MetadataConflictError(Exception):
    """A change broke a rule the schema enforces: a unique key store name, a key in a store that
    does not exist, an alias or grant of a missing key, deleting a store that still has keys.

    The service checks each of these first, inside `write()`, so reaching one is a bug: hence not
    an HsmbridgeError, and the edges treat it as any unexpected exception (an internal error,
    the traceback logged), as they did the driver's own IntegrityError."""


@dataclass(frozen=True)
class StoredKeyStore:
    """A key store row: the public description plus the encrypted kmsuser password."""

    store: CustomKeyStore
    password_blob: bytes


@dataclass(frozen=True)
class DeletedKey:
    """A tombstone kept after a key's deletion completed, for audits."""

    key_id: str
    arn: str
    custom_key_store_id: str
    cluster_id: str
    deleted_at: float
    material_deleted: bool  # False: the material was left in the HSM as an orphan


class MetadataStore(Protocol):
    # True where other hsmbridge instances may be serving from this database at any moment
    # (PostgreSQL), so start-up work must spare what they have in flight; False for one
    # server's own file (SQLite), whose start-up runs before any of its processes serves.
    shared: bool

    def write(self) -> AbstractContextManager[None]:
        """An immediate (write-locked) transaction; commits on success, rolls back on error."""
        ...

    # -- custom key stores ------------------------------------------------------------------
    def put_key_store(self, row: StoredKeyStore) -> None: ...
    def get_key_store(self, store_id: str) -> StoredKeyStore | None: ...
    def get_key_store_by_name(self, name: str) -> StoredKeyStore | None: ...
    def list_key_stores(self, limit: int, after: str | None) -> list[StoredKeyStore]:
        """Ordered by store id; at most `limit` rows with id > `after`."""
        ...

    def count_key_stores(self) -> int: ...
    def delete_key_store(self, store_id: str) -> None: ...
    def failed_logins(self, store_id: str) -> int:
        """kmsuser logins to the store's HSM that failed in a row, as every process counted them
        (0 for an unknown store). `put_key_store` leaves the count alone."""
        ...

    def set_failed_logins(self, store_id: str, count: int) -> None: ...

    # -- keys --------------------------------------------------------------------------------
    def put_key(self, record: KeyRecord) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None:
        """Any lifecycle; callers hide non-LIVE rows from clients."""
        ...

    def list_keys(self, limit: int, after: str | None) -> list[KeyRecord]:
        """LIVE keys ordered by key id; at most `limit` rows with id > `after`."""
        ...

    def keys_in_store(
        self, store_id: str, lifecycle: KeyLifecycle | None = None
    ) -> list[KeyRecord]: ...
    def count_keys_in_store(self, store_id: str) -> int:
        """Every key row of the store, whatever its lifecycle or state."""
        ...

    def keys_due_for_deletion(self, now: float) -> list[KeyRecord]:
        """LIVE PendingDeletion keys whose deletion date has passed, plus DELETING rows."""
        ...

    def delete_key(self, key_id: str) -> None:
        """Remove the key row with its aliases and grants (tags live in the row)."""
        ...

    # -- aliases -----------------------------------------------------------------------------
    def put_alias(self, alias: Alias) -> None: ...
    def get_alias(self, name: str) -> Alias | None: ...
    def delete_alias(self, name: str) -> None: ...
    def list_aliases(self, key_id: str | None, limit: int, after: str | None) -> list[Alias]: ...
    def count_aliases(self, key_id: str) -> int: ...

    # -- grants ------------------------------------------------------------------------------
    def put_grant(self, grant: Grant) -> None: ...
    def get_grant(self, grant_id: str) -> Grant | None: ...
    def delete_grant(self, grant_id: str) -> None: ...
    def list_grants(
        self, key_id: str, limit: int, after: str | None, *, grantee: str | None = None
    ) -> list[Grant]:
        """The key's grants ordered by grant id; at most `limit` with id > `after`."""
        ...

    def grants_for(self, key_id: str, grantees: tuple[str, ...]) -> list[Grant]:
        """The key's grants whose grantee is one of `grantees` (authorization's question)."""
        ...

    def grants_named(self, key_id: str, name: str) -> list[Grant]: ...
    def count_grants(self, key_id: str) -> int: ...
    def retirable_grants(
        self, retiring_principal: str, limit: int, after: str | None
    ) -> list[Grant]:
        """Grants naming `retiring_principal` as retiring principal, ordered by grant id."""
        ...

    # -- tombstones --------------------------------------------------------------------------
    def record_deleted_key(self, tomb: DeletedKey) -> None: ...
    def deleted_keys(self, store_id: str | None = None) -> Iterator[DeletedKey]: ...

    # -- console sign-outs -------------------------------------------------------------------
    def record_sign_out(self, nonce: str, expires_at: float, now: float) -> None:
        """Remember a console session ended before `expires_at`; forgets those expired by `now`."""
        ...

    def signed_out(self, nonce: str) -> bool: ...

    # -- background work that runs once per database ----------------------------------------
    def hold_maintenance(self) -> bool:
        """Whether this process runs the work that must run once per database (the deletion
        sweeper, recovery of stale CreateKeys, finishing interrupted deletions); asked before
        every round. SQLite: always (one server per file; its supervisor does it). PostgreSQL:
        one process among every instance holds it until it exits or loses its database
        connection; the others get False and ask again next round."""
        ...

    def close(self) -> None: ...
