"""The metadata side of a key-label audit: which KMS keys a custom key store holds.

Owns: the `MetadataSource` Protocol (the store's keys, a fresh single-key lookup for re-checks,
deletion tombstones) and its implementation over hsmbridge's own metadata store. The adapter for
any KMS endpoint (boto3) lives in `hsmbridge.audit.kms_source`.

`StoreMetadataSource` reads the `MetadataStore` interface (it writes nothing there). Must not
import service, protocol, http or cli.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from hsmbridge.metadata.store import MetadataStore
from hsmbridge.model import KeyLifecycle, KeyRecord


class KeyStatus(enum.StrEnum):
    LIVE = "live"  # a KMS key clients can see, in any KeyState (PendingDeletion included)
    CREATING = "creating"  # CreateKey recorded its intent; the HSM call may not have happened
    DELETING = "deleting"  # the waiting period is over; material destruction is in progress


@dataclass(frozen=True)
class KnownKey:
    """A KMS key as the metadata side knows it."""

    key_id: str
    arn: str
    custom_key_store_id: str | None
    cluster_id: str | None
    status: KeyStatus
    key_state: str | None = None  # the KMS KeyState wire value, when known


@dataclass(frozen=True)
class Tombstone:
    """A KMS key whose deletion completed."""

    key_id: str
    arn: str
    deleted_at: float
    material_deleted: bool  # False: KMS could not destroy the material (store disconnected)


class MetadataSource(Protocol):
    name: str  # "metadata" or "kms", for reports

    def store_keys(self) -> Iterable[KnownKey]:
        """Every KMS key of the audited store, whatever its state, in one listing."""
        ...

    def lookup(self, key_id: str) -> KnownKey | None:
        """A fresh read of one key in any store; None if no such KMS key exists (any more)."""
        ...

    def tombstones(self) -> Mapping[str, Tombstone]:
        """Completed deletions of the audited store, by key id (empty when unknown)."""
        ...


_STATUS = {
    KeyLifecycle.LIVE: KeyStatus.LIVE,
    KeyLifecycle.CREATING: KeyStatus.CREATING,
    KeyLifecycle.DELETING: KeyStatus.DELETING,
}


def _known(record: KeyRecord) -> KnownKey:
    return KnownKey(
        record.key_id,
        record.arn,
        record.custom_key_store_id,
        record.cluster_id,
        _STATUS[record.lifecycle],
        record.base_state.value,
    )


class StoreMetadataSource:
    """Option (a): hsmbridge's metadata store, which also knows in-flight rows and tombstones."""

    name = "metadata"

    def __init__(self, meta: MetadataStore, store_id: str) -> None:
        self._meta = meta
        self._store_id = store_id

    def store_keys(self) -> list[KnownKey]:
        return [_known(r) for r in self._meta.keys_in_store(self._store_id)]

    def lookup(self, key_id: str) -> KnownKey | None:
        record = self._meta.get_key(key_id)
        return _known(record) if record is not None else None

    def tombstones(self) -> dict[str, Tombstone]:
        return {
            t.key_id: Tombstone(t.key_id, t.arn, t.deleted_at, t.material_deleted)
            for t in self._meta.deleted_keys(self._store_id)
        }
