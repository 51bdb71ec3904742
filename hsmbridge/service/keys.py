"""KMS key lifecycle in a custom key store: CreateKey, DescribeKey, ListKeys, Enable/DisableKey,
Schedule/CancelKeyDeletion, UpdateKeyDescription.

Owns: the crash-safe CreateKey. It writes an intent row (lifecycle CREATING) before the HSM call
and flips it to LIVE after, so `recovery.Recovery` can roll back whatever a crash interrupted by
the label in the HSM: there is never key material without a record nor a record without
material. A failed CreateKey whose clean-up failed too is retried by `retry_abandoned()`.
Deletion at the end of the waiting period is `deletion.KeyDeletion`'s.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn

from hsmbridge import ids
from hsmbridge.backend import BackendError, HsmBackend
from hsmbridge.errors import (
    CloudHsmClusterInvalidConfigurationException,
    DependencyTimeoutException,
    InvalidMarkerException,
    KmsError,
    KMSInternalException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.keystore import quorum
from hsmbridge.keystore.lifecycle import StoreOp, require
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import (
    KeyIdentity,
    KeyLifecycle,
    KeyMetadata,
    KeyRecord,
    KeySpec,
    KeyState,
    KeyUsage,
    Origin,
    Page,
    ScheduledDeletion,
    Tag,
)
from hsmbridge.policy.document import default_policy, parse_policy
from hsmbridge.policy.evaluation import ConditionValue
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm import HsmGateway
from hsmbridge.service.lookup import KeyLookup, require_not_pending
from hsmbridge.service.tags import validate_tags
from hsmbridge.trail.events import AuditEvent

log = logging.getLogger(__name__)
DAY = 86_400.0


@dataclass(frozen=True)
class CreateKeyRequest:
    custom_key_store_id: str | None = None
    origin: str | None = None
    description: str = ""
    key_usage: str | None = None
    key_spec: str | None = None
    customer_master_key_spec: str | None = None
    multi_region: bool | None = None
    xks_key_id: str | None = None
    policy: str | None = None
    bypass_policy_lockout_safety_check: bool = False
    tags: tuple[Tag, ...] = ()


class KeyService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup, hsm: HsmGateway) -> None:
        self._ctx = ctx
        self._lookup = lookup
        self._hsm = hsm
        # Failed CreateKeys whose rollback failed too (by key id); the sweeper retries them.
        # `_lock` guards this and `_in_flight`.
        self._abandoned: dict[str, KeyRecord] = {}
        self._lock = threading.Lock()
        # CreateKeys this process is running now: recovery here never rolls these back, whatever
        # their age says (the service clock is injectable and may jump, as in tests).
        self._in_flight: set[str] = set()

    # -- CreateKey ----------------------------------------------------------------------------
    def create(self, caller: RequestContext, req: CreateKeyRequest) -> KeyMetadata:
        """CreateKey in a CloudHSM key store. https://docs.aws.amazon.com/kms/latest/APIReference/API_CreateKey.html

        Raises UnsupportedOperation, CustomKeyStoreNotFound, CustomKeyStoreInvalidState,
        CloudHsmClusterInvalidConfiguration, MalformedPolicyDocument, TagException,
        LimitExceeded, KeyUnavailable, KMSInternal.
        """
        self._ctx.authorize(caller, "kms:CreateKey", keys=_create_key_conditions(req))
        self._ctx.require_home_account(caller, "kms:CreateKey")
        store_id = _check_create_request(req)
        policy = req.policy
        if policy is None:
            policy = default_policy(self._ctx.settings.partition, self._ctx.settings.account_id)
        else:
            parse_policy(policy)
        validate_tags(req.tags)
        row = self._ctx.store_row(store_id)
        record = self._new_record(row, req.description, policy, req.tags)
        if req.policy is not None:
            self._ctx.access.check_new_key_policy(
                caller,
                record,
                policy,
                bypass_lockout_check=req.bypass_policy_lockout_safety_check,
            )
        require(StoreOp.CREATE_KEY, store_id, row.store.connection_state)
        self._check_quorum(row.store.cluster_id)
        backend = self._hsm.login(row, retryable=DependencyTimeoutException)
        with self._lock:
            self._in_flight.add(record.key_id)
        try:
            live = self._create_in_hsm(backend, record)
        finally:
            with self._lock:
                self._in_flight.discard(record.key_id)
        self._ctx.audit.emit(
            AuditEvent(
                "CreateKey",
                key_arn=live.arn,
                custom_key_store_id=store_id,
                additional={"backingKeyId": live.key_id, "clusterId": live.cluster_id},
            )
        )
        return self._lookup.metadata(live)

    def _create_in_hsm(self, backend: HsmBackend, record: KeyRecord) -> KeyRecord:
        """Intent row, HSM key, LIVE row: the crash-safe sequence of CreateKey."""
        with self._ctx.meta.write():
            self._ctx.meta.put_key(record)  # intent: visible to recovery, hidden from clients
        self._generate(backend, record)
        with self._ctx.meta.write():
            current = self._ctx.meta.get_key(record.key_id)
            if current is None or current.lifecycle is not KeyLifecycle.CREATING:
                _destroy_quietly(backend, record.arn)  # another process rolled the intent back
                raise KMSInternalException("Key creation was interrupted; retry the request.")
            live = replace(record, lifecycle=KeyLifecycle.LIVE)
            self._ctx.meta.put_key(live)
        return live

    def _check_quorum(self, cluster_id: str) -> None:
        cluster = self._ctx.clusters.describe(cluster_id)
        if cluster is None:
            raise CloudHsmClusterInvalidConfigurationException(
                f"The CloudHSM cluster {cluster_id} of this custom key store no longer exists."
            )
        self._ctx.clusters.require_quorum(quorum.Operation.CREATE_KEY, cluster)

    def _new_record(
        self, row: StoredKeyStore, description: str, policy: str, tags: tuple[Tag, ...]
    ) -> KeyRecord:
        s = self._ctx.settings
        key_id = ids.new_key_id()
        return KeyRecord(
            key_id=key_id,
            arn=ids.key_arn(s.partition, s.region, s.account_id, key_id),
            account_id=s.account_id,
            region=s.region,
            custom_key_store_id=row.store.store_id,
            cluster_id=row.store.cluster_id,
            description=description,
            base_state=KeyState.ENABLED,
            creation_date=self._ctx.clock(),
            policy=policy,
            lifecycle=KeyLifecycle.CREATING,
            tags=tags,
        )

    def _generate(self, backend: HsmBackend, record: KeyRecord) -> None:
        # CreateKey's model lists DependencyTimeoutException, not KeyUnavailable, for retries.
        with self._hsm.translated(record.arn, retryable=DependencyTimeoutException):
            self._generate_or_clean_up(backend, record)

    def _generate_or_clean_up(self, backend: HsmBackend, record: KeyRecord) -> None:
        try:
            # The ARN embeds a UUID4 minted for this key: no HSM key can carry it yet.
            backend.generate_key(record.arn, record.key_id.encode("ascii"), fresh_label=True)
        except BackendError:
            # The HSM may or may not hold the key now; remove both sides or leave it to recovery.
            try:
                _destroy(backend, record.arn)
                with self._ctx.meta.write():
                    self._ctx.meta.delete_key(record.key_id)
            except BackendError:
                log.warning("CreateKey cleanup of %s deferred to the sweeper", record.key_id)
                with self._lock:
                    self._abandoned[record.key_id] = record
            raise

    def retry_abandoned(self) -> None:
        """Finish the cleanups of failed CreateKeys that the HSM refused at the time.

        Without this the intent row and possibly the HSM key would wait for the next restart or
        reconnect (`recover_store`), however long the server runs.
        """
        with self._lock:
            pending = list(self._abandoned.values())
        for record in pending:
            try:
                # The login before the transaction: StoreConnections takes its lock before
                # metadata transactions, never inside one. A row past CREATING never returns.
                current = self._ctx.meta.get_key(record.key_id)
                if current is not None and current.lifecycle is KeyLifecycle.CREATING:
                    backend = self._hsm.for_key(record)
                    with self._ctx.meta.write():
                        current = self._ctx.meta.get_key(record.key_id)
                        if current is not None and current.lifecycle is KeyLifecycle.CREATING:
                            _destroy(backend, record.arn)
                            self._ctx.meta.delete_key(record.key_id)
            except (BackendError, KmsError) as exc:
                log.warning(
                    "CreateKey cleanup of %s postponed: %s", record.key_id, type(exc).__name__
                )
                continue
            with self._lock:
                self._abandoned.pop(record.key_id, None)
            log.info("rolled back the failed CreateKey %s", record.key_id)

    def in_flight(self) -> set[str]:
        """Key ids of the CreateKeys this process is running now (recovery spares them)."""
        with self._lock:
            return set(self._in_flight)

    # -- DescribeKey / ListKeys ---------------------------------------------------------------
    def describe(self, caller: RequestContext, key_ref: str) -> KeyMetadata:
        """DescribeKey. https://docs.aws.amazon.com/kms/latest/APIReference/API_DescribeKey.html"""
        record = self._lookup.resolve(caller, key_ref, allow_alias=True)
        self._ctx.authorize_key(caller, "kms:DescribeKey", record)
        return self._lookup.metadata(record)

    def list(
        self, caller: RequestContext, limit: int | None, marker: str | None
    ) -> Page[KeyIdentity]:
        """ListKeys (Limit 1-1000, default 100). https://docs.aws.amazon.com/kms/latest/APIReference/API_ListKeys.html"""
        self._ctx.authorize(caller, "kms:ListKeys")
        if self._ctx.is_foreign(caller):
            return Page(())  # ListKeys shows the caller's own account, which holds none here
        size = limit or 100
        if marker is not None and not ids.is_key_id(marker):
            raise InvalidMarkerException("The Marker is not one that ListKeys returned.")
        rows = self._ctx.meta.list_keys(size + 1, marker)
        items = tuple(KeyIdentity(r.key_id, r.arn) for r in rows[:size])
        return Page(items, items[-1].key_id if len(rows) > size else None)

    def refuse_rotation(self, caller: RequestContext, key_ref: str, action: str) -> NoReturn:
        """Get/Enable/DisableKeyRotation: KMS refuses them for keys in custom key stores."""
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(caller, action, record)
        raise UnsupportedOperationException(
            f"{record.arn} is in a custom key store; automatic key rotation is not supported "
            "for KMS keys in custom key stores."
        )

    # -- state changes ------------------------------------------------------------------------
    def _mutate(
        self,
        caller: RequestContext,
        action: str,
        key_ref: str,
        change: Callable[[KeyRecord], KeyRecord],
        keys: dict[str, ConditionValue] | None = None,
    ) -> KeyRecord:
        with self._ctx.meta.write():
            record = self._lookup.resolve(caller, key_ref, allow_alias=False)
            self._ctx.authorize_key(caller, action, record, keys=keys)
            updated = change(record)
            self._ctx.meta.put_key(updated)
            return updated

    def enable(self, caller: RequestContext, key_ref: str) -> None:
        """EnableKey; on an Unavailable key the change takes effect at reconnect."""
        self._mutate(
            caller,
            "kms:EnableKey",
            key_ref,
            lambda r: replace(require_not_pending(r), base_state=KeyState.ENABLED),
        )

    def disable(self, caller: RequestContext, key_ref: str) -> None:
        """DisableKey; on an Unavailable key the change takes effect at reconnect."""
        self._mutate(
            caller,
            "kms:DisableKey",
            key_ref,
            lambda r: replace(require_not_pending(r), base_state=KeyState.DISABLED),
        )

    def update_description(self, caller: RequestContext, key_ref: str, description: str) -> None:
        if len(description) > 8192:
            raise ValidationException("Description must be at most 8192 characters long.")
        self._mutate(
            caller,
            "kms:UpdateKeyDescription",
            key_ref,
            lambda r: replace(require_not_pending(r), description=description),
        )

    def schedule_deletion(
        self, caller: RequestContext, key_ref: str, window_days: int | None
    ) -> ScheduledDeletion:
        """ScheduleKeyDeletion (7-30 days, default 30); KMSInvalidState if already pending."""
        days = 30 if window_days is None else window_days
        if not 7 <= days <= 30:
            raise ValidationException(
                f"PendingWindowInDays must be between 7 and 30 days; got {days}."
            )
        when = self._ctx.clock() + days * DAY
        record = self._mutate(
            caller,
            "kms:ScheduleKeyDeletion",
            key_ref,
            lambda r: replace(
                require_not_pending(r),
                base_state=KeyState.PENDING_DELETION,
                deletion_date=when,
                pending_window_days=days,
            ),
            keys={"kms:ScheduleKeyDeletionPendingWindowInDays": days},
        )
        return ScheduledDeletion(record.arn, when, days)

    def cancel_deletion(self, caller: RequestContext, key_ref: str) -> KeyIdentity:
        """CancelKeyDeletion: the key becomes Disabled, not Enabled."""

        def change(r: KeyRecord) -> KeyRecord:
            if r.base_state is not KeyState.PENDING_DELETION:
                raise KMSInvalidStateException(f"{r.arn} is not pending deletion.")
            return replace(
                r, base_state=KeyState.DISABLED, deletion_date=None, pending_window_days=None
            )

        record = self._mutate(caller, "kms:CancelKeyDeletion", key_ref, change)
        return KeyIdentity(record.key_id, record.arn)


def _destroy(backend: HsmBackend, label: str) -> int:
    return backend.destroy_key(label)


def _destroy_quietly(backend: HsmBackend, label: str) -> None:
    try:
        backend.destroy_key(label)
    except BackendError:
        log.warning("could not destroy the material of an abandoned CreateKey; audit will show it")


def _create_key_conditions(req: CreateKeyRequest) -> dict[str, ConditionValue]:
    """CreateKey's request condition keys."""
    keys: dict[str, ConditionValue] = {
        "kms:KeyOrigin": req.origin or "AWS_KMS",
        "kms:KeySpec": req.key_spec or req.customer_master_key_spec or "SYMMETRIC_DEFAULT",
        "kms:KeyUsage": req.key_usage or "ENCRYPT_DECRYPT",
        "kms:BypassPolicyLockoutSafetyCheck": req.bypass_policy_lockout_safety_check,
    }
    if req.tags:
        keys["aws:TagKeys"] = tuple(t.key for t in req.tags)
        for tag in req.tags:
            keys[f"aws:RequestTag/{tag.key}"] = tag.value
    return keys


def _check_create_request(req: CreateKeyRequest) -> str:
    """Shape rules of CreateKey for this service; returns the store id."""
    spec = req.key_spec or req.customer_master_key_spec or KeySpec.SYMMETRIC_DEFAULT.value
    if (
        req.key_spec
        and req.customer_master_key_spec
        and req.key_spec != req.customer_master_key_spec
    ):
        raise ValidationException("KeySpec and CustomerMasterKeySpec must not differ.")
    origin = req.origin or "AWS_KMS"
    if req.custom_key_store_id is None:
        if origin == Origin.AWS_CLOUDHSM.value:
            raise ValidationException("CustomKeyStoreId is required when Origin is AWS_CLOUDHSM.")
        # NOTE: differs from KMS, which also creates AWS_KMS keys; hsmbridge only holds keys whose
        # material lives in a custom key store's HSM.
        raise UnsupportedOperationException(
            f"Origin {origin} is not supported by this service; create keys with "
            "Origin=AWS_CLOUDHSM and a CustomKeyStoreId."
        )
    if origin != Origin.AWS_CLOUDHSM.value:
        raise UnsupportedOperationException(
            f"A key in a CloudHSM key store must have Origin AWS_CLOUDHSM, not {origin}."
        )
    if spec != KeySpec.SYMMETRIC_DEFAULT.value:
        raise UnsupportedOperationException(
            f"KeySpec {spec} is not supported in a custom key store; use SYMMETRIC_DEFAULT."
        )
    if (req.key_usage or KeyUsage.ENCRYPT_DECRYPT.value) != KeyUsage.ENCRYPT_DECRYPT.value:
        raise UnsupportedOperationException(
            f"KeyUsage {req.key_usage} is not supported in a custom key store; use ENCRYPT_DECRYPT."
        )
    if req.multi_region:
        raise UnsupportedOperationException("Multi-Region keys cannot be in a custom key store.")
    if req.xks_key_id is not None:
        raise UnsupportedOperationException("XksKeyId applies only to external key stores.")
    if len(req.description) > 8192:
        raise ValidationException("Description must be at most 8192 characters long.")
    return req.custom_key_store_id
