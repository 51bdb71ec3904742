"""The dependencies every service component shares, wired once by a composition root.

Owns: `ServiceContext` (settings, metadata store, cluster inventory, password vault, live HSM
logins, clock, audit sink, access control) and the small helpers that read through it: loading a
store or raising the KMS error for a missing one, the kmsuser password of a store, and asking
access control whether a caller may act. Must not import protocol, http or cli.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hsmbridge.config import Settings
from hsmbridge.errors import CustomKeyStoreNotFoundException, KMSInternalException
from hsmbridge.keystore.inventory import ClusterInventory
from hsmbridge.keystore.passwords import PasswordVault, SealedPasswordError
from hsmbridge.metadata.store import MetadataStore, StoredKeyStore
from hsmbridge.request import RequestContext
from hsmbridge.service.access import AccessControl
from hsmbridge.service.clusters import ClusterFacts
from hsmbridge.service.connections import StoreConnections
from hsmbridge.trail import context as audit_context
from hsmbridge.trail.events import AuditSink, NullSink

Clock = Callable[[], float]


@dataclass
class ServiceContext:
    settings: Settings
    meta: MetadataStore
    inventory: ClusterInventory
    vault: PasswordVault
    connections: StoreConnections
    clock: Clock = time.time
    audit: AuditSink = field(default_factory=NullSink)
    clusters: ClusterFacts = field(init=False)
    access: AccessControl = field(init=False)

    def __post_init__(self) -> None:
        self.clusters = ClusterFacts(self.inventory)
        self.access = AccessControl(self.settings.account_id)

    def authorize(self, caller: RequestContext, action: str, resource: str | None = None) -> None:
        self.access.authorize(caller, action, resource)

    def store_row(self, store_id: str) -> StoredKeyStore:
        row = self.meta.get_key_store(store_id)
        if row is None:
            raise CustomKeyStoreNotFoundException(
                f"Custom key store {store_id} does not exist in account "
                f"{self.settings.account_id} and region {self.settings.region}."
            )
        audit_context.annotate_store(store_id)  # the request's customKeyStoreId, if any
        return row

    def password_of(self, row: StoredKeyStore) -> str:
        try:
            return self.vault.unseal(row.password_blob, row.store.store_id)
        except SealedPasswordError as exc:
            raise KMSInternalException(
                f"The stored kmsuser password of custom key store {row.store.store_id} cannot be "
                "decrypted (was the master key file replaced?). Disconnect the store and set "
                "KeyStorePassword again with UpdateCustomKeyStore."
            ) from exc
