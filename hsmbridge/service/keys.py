"""KMS key lifecycle in a custom key store: CreateKey, DescribeKey, ListKeys, Enable/DisableKey,
Schedule/CancelKeyDeletion, UpdateKeyDescription, and crash recovery of key creation/deletion.

Owns: the crash-safe protocol around the HSM. CreateKey writes an intent row (lifecycle CREATING)
before the HSM call and flips it to LIVE after; deletion flips the row to DELETING before destroying
material. `recover_store()` finishes or rolls back whatever a crash left, using the label in the
HSM, so there is never key material without a record nor a record without material.
Must not import api or cli.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from hsmbridge import ids
from hsmbridge.audit.events import AuditEvent
from hsmbridge.backend import BackendError, HsmBackend
from hsmbridge.errors import (
    CloudHsmClusterInvalidConfigurationException,
    CustomKeyStoreInvalidStateException,
    DependencyTimeoutException,
    InvalidMarkerException,
    KeyUnavailableException,
    KmsError,
    KMSInternalException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.keystore import quorum
from hsmbridge.keystore.lifecycle import StoreOp, require
from hsmbridge.metadata.store import DeletedKey, StoredKeyStore
from hsmbridge.model import (
    ConnectionState,
    KeyLifecycle,
    KeyMetadata,
    KeyRecord,
    KeySpec,
    KeyState,
    KeyUsage,
    Origin,
    Page,
    Tag,
)
from hsmbridge.policy.document import default_policy, parse_policy
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm_errors import to_kms_error
from hsmbridge.service.lookup import KeyLookup, require_not_pending
from hsmbridge.service.tags import validate_tags

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
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup) -> None:
        self._ctx = ctx
        self._lookup = lookup
        # Failed CreateKeys whose rollback failed too (by key id); the sweeper retries them.
        # `_lock` guards this and `_in_flight`.
        self._abandoned: dict[str, KeyRecord] = {}
        self._lock = threading.Lock()
        # CreateKeys this process is running now: recovery here never rolls these back, whatever
        # their age says (the service clock is injectable and may jump, as in tests).
        self._in_flight: set[str] = set()

    # -- CreateKey ----------------------------------------------------------------------------
    def create(self, req: CreateKeyRequest) -> KeyMetadata:
        """CreateKey in a CloudHSM key store. https://docs.aws.amazon.com/kms/latest/APIReference/API_CreateKey.html

        Raises UnsupportedOperation, CustomKeyStoreNotFound, CustomKeyStoreInvalidState,
        CloudHsmClusterInvalidConfiguration, MalformedPolicyDocument, TagException,
        LimitExceeded, KeyUnavailable, KMSInternal.
        """
        store_id = _check_create_request(req)
        policy = req.policy
        if policy is None:
            policy = default_policy(self._ctx.settings.partition, self._ctx.settings.account_id)
        else:
            parse_policy(policy)
        validate_tags(req.tags)
        row = self._ctx.store_row(store_id)
        require(StoreOp.CREATE_KEY, store_id, row.store.connection_state)
        self._check_quorum(row.store.cluster_id)
        backend = self._backend(row, DependencyTimeoutException)
        record = self._new_record(row, req.description, policy, req.tags)
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
        verdict = quorum.check(quorum.Operation.CREATE_KEY, cluster)
        if not verdict.ok:
            raise CloudHsmClusterInvalidConfigurationException(verdict.message)

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
        try:
            # The ARN embeds a UUID4 minted for this key: no HSM key can carry it yet.
            backend.generate_key(record.arn, record.key_id.encode("ascii"), fresh_label=True)
        except BackendError as exc:
            # The HSM may or may not hold the key now; remove both sides or leave it to recovery.
            try:
                _destroy(backend, record.arn)
                with self._ctx.meta.write():
                    self._ctx.meta.delete_key(record.key_id)
            except BackendError:
                log.warning("CreateKey cleanup of %s deferred to the sweeper", record.key_id)
                with self._lock:
                    self._abandoned[record.key_id] = record
            # CreateKey's model lists DependencyTimeoutException, not KeyUnavailable, for retries.
            raise to_kms_error(exc, record.arn, retryable=DependencyTimeoutException) from exc

    def _retry_abandoned(self) -> None:
        """Finish the cleanups of failed CreateKeys that the HSM refused at the time.

        Without this the intent row and possibly the HSM key would wait for the next restart or
        reconnect (`recover_store`), however long the server runs.
        """
        with self._lock:
            pending = list(self._abandoned.values())
        for record in pending:
            try:
                with self._ctx.meta.write():
                    current = self._ctx.meta.get_key(record.key_id)
                    if current is not None and current.lifecycle is KeyLifecycle.CREATING:
                        _destroy(self.backend_for(record), record.arn)
                        self._ctx.meta.delete_key(record.key_id)
            except (BackendError, KmsError) as exc:
                log.warning(
                    "CreateKey cleanup of %s postponed: %s", record.key_id, type(exc).__name__
                )
                continue
            with self._lock:
                self._abandoned.pop(record.key_id, None)
            log.info("rolled back the failed CreateKey %s", record.key_id)

    def _backend(
        self, row: StoredKeyStore, retryable: type[KmsError] = KeyUnavailableException
    ) -> HsmBackend:
        store = row.store
        try:
            return self._ctx.connections.get(
                store.store_id, store.cluster_id, lambda: self._ctx.password_of(row)
            )
        except BackendError as exc:
            raise to_kms_error(exc, retryable=retryable) from exc

    def backend_for(self, record: KeyRecord, row: StoredKeyStore | None = None) -> HsmBackend:
        """The live login for a key's store (`row`, if the caller already read it); the store
        must be CONNECTED."""
        row = row or self._ctx.store_row(record.custom_key_store_id)
        if row.store.connection_state is not ConnectionState.CONNECTED:
            self._ctx.connections.detach(row.store.store_id)
            raise KMSInvalidStateException(f"{record.arn} is unavailable.")
        return self._backend(row)

    # -- DescribeKey / ListKeys ---------------------------------------------------------------
    def describe(self, key_ref: str) -> KeyMetadata:
        """DescribeKey. https://docs.aws.amazon.com/kms/latest/APIReference/API_DescribeKey.html"""
        return self._lookup.metadata(self._lookup.resolve(key_ref, allow_alias=True))

    def list(self, limit: int | None, marker: str | None) -> Page[KeyRecord]:
        """ListKeys (Limit 1-1000, default 100). https://docs.aws.amazon.com/kms/latest/APIReference/API_ListKeys.html"""
        size = limit or 100
        if marker is not None and not ids.is_key_id(marker):
            raise InvalidMarkerException("The Marker is not one that ListKeys returned.")
        rows = self._ctx.meta.list_keys(size + 1, marker)
        items = tuple(rows[:size])
        return Page(items, items[-1].key_id if len(rows) > size else None)

    # -- state changes ------------------------------------------------------------------------
    def _mutate(self, key_ref: str, change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        with self._ctx.meta.write():
            record = self._lookup.resolve(key_ref, allow_alias=False)
            updated = change(record)
            self._ctx.meta.put_key(updated)
            return updated

    def enable(self, key_ref: str) -> None:
        """EnableKey; on an Unavailable key the change takes effect at reconnect (spec §6.2)."""
        self._mutate(
            key_ref, lambda r: replace(require_not_pending(r), base_state=KeyState.ENABLED)
        )

    def disable(self, key_ref: str) -> None:
        """DisableKey; on an Unavailable key the change takes effect at reconnect (spec §6.2)."""
        self._mutate(
            key_ref, lambda r: replace(require_not_pending(r), base_state=KeyState.DISABLED)
        )

    def update_description(self, key_ref: str, description: str) -> None:
        if len(description) > 8192:
            raise ValidationException("Description must be at most 8192 characters long.")
        self._mutate(key_ref, lambda r: replace(require_not_pending(r), description=description))

    def schedule_deletion(self, key_ref: str, window_days: int | None) -> KeyRecord:
        """ScheduleKeyDeletion (7-30 days, default 30); KMSInvalidState if already pending."""
        days = 30 if window_days is None else window_days
        if not 7 <= days <= 30:
            raise ValidationException(
                f"PendingWindowInDays must be between 7 and 30 days; got {days}."
            )
        when = self._ctx.clock() + days * DAY
        return self._mutate(
            key_ref,
            lambda r: replace(
                require_not_pending(r),
                base_state=KeyState.PENDING_DELETION,
                deletion_date=when,
                pending_window_days=days,
            ),
        )

    def cancel_deletion(self, key_ref: str) -> KeyRecord:
        """CancelKeyDeletion: the key becomes Disabled, not Enabled (spec §6.4)."""

        def change(r: KeyRecord) -> KeyRecord:
            if r.base_state is not KeyState.PENDING_DELETION:
                raise KMSInvalidStateException(f"{r.arn} is not pending deletion.")
            return replace(
                r, base_state=KeyState.DISABLED, deletion_date=None, pending_window_days=None
            )

        return self._mutate(key_ref, change)

    # -- deletion sweeper and recovery ----------------------------------------------------------
    def sweep_deletions(self) -> int:
        """Delete every key whose waiting period is over; returns how many went."""
        self._retry_abandoned()
        done = 0
        for record in self._ctx.meta.keys_due_for_deletion(self._ctx.clock()):
            try:
                self._finish_deletion(record)
                done += 1
            except (BackendError, CustomKeyStoreInvalidStateException) as exc:
                log.warning("deletion of %s postponed: %s", record.key_id, type(exc).__name__)
        return done

    def _finish_deletion(self, record: KeyRecord) -> None:
        with self._ctx.meta.write():
            # Re-read: another process (the sweeper, or recovery after a connect) may have
            # finished this deletion already, and an upsert of our copy would resurrect the row.
            current = self._ctx.meta.get_key(record.key_id)
            if current is None or current.base_state is not KeyState.PENDING_DELETION:
                return
            record = replace(current, lifecycle=KeyLifecycle.DELETING)
            self._ctx.meta.put_key(record)
        row = self._ctx.meta.get_key_store(record.custom_key_store_id)
        connected = row is not None and row.store.connection_state is ConnectionState.CONNECTED
        destroyed = 0
        if connected and row is not None:
            destroyed = _destroy(self._backend(row), record.arn)
        status = "SUCCESS" if connected else "FAILURE"
        with self._ctx.meta.write():
            if self._ctx.meta.get_key(record.key_id) is None:
                return  # finished concurrently; that process records the tombstone and event
            self._ctx.meta.record_deleted_key(
                DeletedKey(
                    record.key_id,
                    record.arn,
                    record.custom_key_store_id,
                    record.cluster_id,
                    self._ctx.clock(),
                    material_deleted=connected,
                )
            )
            self._ctx.meta.delete_key(record.key_id)
        self._ctx.audit.emit(
            AuditEvent(
                "DeleteKey",
                key_arn=record.arn,
                custom_key_store_id=record.custom_key_store_id,
                additional={
                    "eventType": "AwsServiceEvent",
                    "clusterId": record.cluster_id,
                    # NOTE: handles are process-local in PKCS#11; the backing key id (CKA_ID) and
                    # the label identify the material across processes instead.
                    "backingKeys": [{"backingKeyId": record.key_id, "keyLabel": record.arn}],
                    "backingKeysDeletionStatus": [
                        {
                            "backingKeyId": record.key_id,
                            "deletionStatus": status,
                            "objectsDestroyed": destroyed,
                        }
                    ],
                },
            )
        )

    def recover_store(self, store_id: str, *, in_flight_grace_s: float = 0.0) -> int:
        """Roll back interrupted creations and finish interrupted deletions of a connected store.

        With no other process serving (start-up), every CREATING intent is interrupted. Otherwise
        (`in_flight_grace_s` > 0: after a connect, or the periodic sweep of a multi-process
        server) intents younger than the grace may belong to a live request and are left alone.
        """
        row = self._ctx.store_row(store_id)
        if row.store.connection_state is not ConnectionState.CONNECTED:
            return 0
        fixed = 0
        cutoff = self._ctx.clock() - in_flight_grace_s
        with self._lock:
            ours = set(self._in_flight)
        creating = [
            r
            for r in self._ctx.meta.keys_in_store(store_id, KeyLifecycle.CREATING)
            if r.key_id not in ours and (not in_flight_grace_s or r.creation_date <= cutoff)
        ]
        for record in creating:
            _destroy(self._backend(row), record.arn)
            with self._ctx.meta.write():
                self._ctx.meta.delete_key(record.key_id)
            log.info("recovery: rolled back interrupted CreateKey %s", record.key_id)
            fixed += 1
        if creating:
            fixed += _destroy_unfinished(self._backend(row))
        for record in self._ctx.meta.keys_in_store(store_id, KeyLifecycle.DELETING):
            self._finish_deletion(record)
            fixed += 1
        return fixed


def _destroy(backend: HsmBackend, label: str) -> int:
    return backend.destroy_key(label)


def _destroy_unfinished(backend: HsmBackend) -> int:
    """Destroy the key objects an interrupted key generation left without label, id or value.

    SoftHSM2 writes a new object's file with default attributes first and applies the template
    (label, CKA_ID) and the key value in later writes; a process killed in between leaves a
    secret key with an empty label, an empty CKA_ID and a zero-length value, which recovery cannot
    find by label. hsmbridge never creates such an object and it holds no key material, so
    recovery of an interrupted CreateKey removes exactly that shape and nothing else.
    """
    doomed = [
        info
        for info in backend.list_keys()
        if not info.label and not info.key_id and info.value_len == 0
    ]
    for info in doomed:
        backend.destroy_key("", handle=info.handle)
        log.warning("recovery: destroyed a half-created HSM key object (handle %d)", info.handle)
    return len(doomed)


def _destroy_quietly(backend: HsmBackend, label: str) -> None:
    try:
        backend.destroy_key(label)
    except BackendError:
        log.warning("could not destroy the material of an abandoned CreateKey; audit will show it")


def _check_create_request(req: CreateKeyRequest) -> str:
    """Shape rules of CreateKey for this service (spec §5.1, §5.2); returns the store id."""
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
