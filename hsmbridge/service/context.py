"""The dependencies every service component shares, wired once by a composition root.

Owns: `ServiceContext` (settings, metadata store, cluster inventory, password vault, live HSM
logins, clock, audit sink, access control, request quotas) and the small helpers that read
through it: loading a store or raising the KMS error for a missing one, the kmsuser password of a
store, and asking access control whether a caller may act. Must not import protocol, http or cli.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hsmbridge.config import Settings
from hsmbridge.errors import (
    CustomKeyStoreNotFoundException,
    KMSInternalException,
    UnsupportedOperationException,
)
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.keystore.inventory import ClusterInventory
from hsmbridge.keystore.passwords import PasswordRecord, PasswordVault, SealedPasswordError
from hsmbridge.metadata.store import MetadataStore, StoredKeyStore
from hsmbridge.model import KeyRecord
from hsmbridge.policy.decision import Decision
from hsmbridge.policy.evaluation import ConditionValue
from hsmbridge.request import RequestContext
from hsmbridge.service.access import AccessControl
from hsmbridge.service.clusters import ClusterFacts
from hsmbridge.service.connections import StoreConnections
from hsmbridge.service.quotas import Quotas, Unlimited
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
    iam: IamDirectory | None = None  # None: read the configuration's iam/ directory
    quotas: Quotas = field(default_factory=Unlimited)  # `[quotas]`; off by default
    clusters: ClusterFacts = field(init=False)
    access: AccessControl = field(init=False)

    def __post_init__(self) -> None:
        self.clusters = ClusterFacts(self.inventory)
        if self.iam is None:
            self.iam = IamDirectory(self.settings.iam_dir)
        self.access = AccessControl(
            self.iam,
            self.meta,
            # Late-bound: tests replace `clock` on a built context.
            clock=lambda: self.clock(),  # noqa: PLW0108
            aliases_of=self._alias_names,
        )

    def _alias_names(self, key_id: str) -> list[str]:
        return [a.name for a in self.meta.list_aliases(key_id, 50, None)]

    def authorize(
        self,
        caller: RequestContext,
        action: str,
        resource: str | None = None,
        *,
        keys: Mapping[str, ConditionValue] | None = None,
    ) -> None:
        """An action without a key: IAM policies alone decide (AccessDeniedException)."""
        self.access.authorize(caller, action, resource, keys=keys)

    def authorize_key(
        self,
        caller: RequestContext,
        action: str,
        key: KeyRecord,
        *,
        context: Mapping[str, str] | None = None,
        keys: Mapping[str, ConditionValue] | None = None,
    ) -> Decision:
        """An action on a key: key policy, IAM, session policy and grants (AccessDenied)."""
        return self.access.authorize_key(caller, action, key, context=context, keys=keys)

    def is_foreign(self, caller: RequestContext) -> bool:
        """Is the caller a principal of another account than the one this endpoint keeps?"""
        return not caller.is_service and caller.account_id != self.settings.account_id

    def require_home_account(self, caller: RequestContext, action: str) -> None:
        """Refuse to create or manage account-owned resources for another account.

        NOTE: differs from KMS, which keeps resources for every account: one hsmbridge endpoint
        keeps the keys, aliases and key stores of its configured account. Principals of other
        accounts use its keys across accounts, as KMS allows.
        """
        if self.is_foreign(caller):
            raise UnsupportedOperationException(
                f"{action} as {caller.principal_arn}: this endpoint keeps KMS keys, aliases and "
                f"custom key stores for account {self.settings.account_id} only; principals of "
                f"account {caller.account_id} can use its keys across accounts by key ARN."
            )

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
        return self.password_record(row).current

    def password_record(self, row: StoredKeyStore) -> PasswordRecord:
        try:
            return self.vault.unseal_record(row.password_blob, row.store.store_id)
        except SealedPasswordError as exc:
            raise KMSInternalException(
                f"The stored kmsuser password of custom key store {row.store.store_id} cannot be "
                "decrypted (was the master key file replaced?). Disconnect the store and set "
                "KeyStorePassword again with UpdateCustomKeyStore."
            ) from exc
