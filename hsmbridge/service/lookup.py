"""Resolve a `KeyId` member to a key, derive its effective state, and build its KeyMetadata.

Owns: KMS's rules for which identifier forms each operation accepts, the account/region
check on ARNs, the derived `Unavailable` state (keys of a store that is not CONNECTED are
Unavailable, except PendingDeletion), and the KeyMetadata shape KMS returns for a custom key
store key.
Must not import protocol, http or cli.
"""

from __future__ import annotations

from hsmbridge import ids
from hsmbridge.errors import KMSInvalidStateException, NotFoundException
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionState, KeyLifecycle, KeyMetadata, KeyRecord, KeyState
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext
from hsmbridge.trail import context as audit_context


def require_not_pending(record: KeyRecord) -> KeyRecord:
    """Management operations are refused while deletion is pending (KMSInvalidState)."""
    if record.base_state is KeyState.PENDING_DELETION:
        raise KMSInvalidStateException(f"{record.arn} is pending deletion.")
    return record


def effective_state(record: KeyRecord, store: StoredKeyStore | None) -> KeyState:
    if record.base_state is KeyState.PENDING_DELETION:
        return KeyState.PENDING_DELETION
    if store is None or store.store.connection_state is not ConnectionState.CONNECTED:
        return KeyState.UNAVAILABLE
    return record.base_state


class KeyLookup:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def resolve(
        self, caller: RequestContext | None, key_ref: str, *, allow_alias: bool
    ) -> KeyRecord:
        """The LIVE key a `KeyId` names, or NotFoundException in KMS's words.

        A key id or alias name means a key of the caller's account; keys of other accounts are
        named by ARN. `caller=None` looks in the endpoint's account (a ciphertext
        names its key, whoever presents it).
        """
        ref = ids.parse_key_ref(key_ref, allow_alias=allow_alias)
        settings = self._ctx.settings
        account = ref.account if ref.region is not None else None
        if account is None and caller is not None and not caller.is_service:
            account = caller.account_id
        account = account or settings.account_id
        partition = ref.partition or settings.partition
        if (
            (ref.region or settings.region) != settings.region
            or account != settings.account_id
            or partition != settings.partition
        ):
            # NOTE: one endpoint keeps the keys of its configured partition, region and account
            # only (principals of any account may use them across accounts); an ARN naming any
            # other (`arn:aws-cn:...` at an `aws` endpoint) names no key here.
            name = (
                self._alias_arn(ref.value, account, partition)
                if ref.is_alias
                else self._key_arn(ref.value, account, partition)
            )
            raise NotFoundException(f"{name} does not exist in this endpoint's Region and account.")
        key_id = ref.value
        audit_context.note_request_alias(ref.value if ref.is_alias else None)
        if ref.is_alias:
            alias = self._ctx.meta.get_alias(ref.value)
            if alias is None:
                raise NotFoundException(f"Alias {self._alias_arn(ref.value)} is not found.")
            key_id = alias.target_key_id
        record = self._ctx.meta.get_key(key_id) if ids.is_key_id(key_id) else None
        if record is None or record.lifecycle is not KeyLifecycle.LIVE:
            raise NotFoundException(f"Key '{self._key_arn(key_id)}' does not exist")
        audit_context.annotate_key(record.arn, record.custom_key_store_id)  # the request's keyArn
        return record

    def store_of(self, record: KeyRecord) -> StoredKeyStore | None:
        return self._ctx.meta.get_key_store(record.custom_key_store_id)

    def state(self, record: KeyRecord) -> KeyState:
        return effective_state(record, self.store_of(record))

    def metadata(self, record: KeyRecord) -> KeyMetadata:
        state = self.state(record)
        return KeyMetadata(
            aws_account_id=record.account_id,
            key_id=record.key_id,
            arn=record.arn,
            creation_date=record.creation_date,
            enabled=state is KeyState.ENABLED,
            description=record.description,
            key_usage=record.key_usage,
            key_state=state,
            origin=record.origin,
            custom_key_store_id=record.custom_key_store_id,
            cloud_hsm_cluster_id=record.cluster_id,
            key_spec=record.key_spec,
            deletion_date=record.deletion_date
            if record.base_state is KeyState.PENDING_DELETION
            else None,
        )

    def _key_arn(
        self, key_id: str, account: str | None = None, partition: str | None = None
    ) -> str:
        s = self._ctx.settings
        return ids.key_arn(partition or s.partition, s.region, account or s.account_id, key_id)

    def _alias_arn(
        self, name: str, account: str | None = None, partition: str | None = None
    ) -> str:
        s = self._ctx.settings
        return ids.alias_arn(partition or s.partition, s.region, account or s.account_id, name)
