"""Custom key store operations: Create, Describe, Connect, Disconnect, Update, Delete.

Owns: the KMS semantics of the key store lifecycle: preconditions, the order of checks, the
asynchronous connect (CONNECTING → CONNECTED or FAILED with a ConnectionErrorCode), and turning
cluster and HSM facts into the exceptions KMS uses. Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace

from hsmbridge import ids
from hsmbridge.backend import BackendError, HsmUnreachableError, LoginError
from hsmbridge.errors import (
    CloudHsmClusterInUseException,
    CloudHsmClusterInvalidConfigurationException,
    CloudHsmClusterNotActiveException,
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    CustomKeyStoreHasCMKsException,
    CustomKeyStoreNameInUseException,
    CustomKeyStoreNotFoundException,
    LimitExceededException,
    ValidationException,
)
from hsmbridge.keystore import quorum
from hsmbridge.keystore.inventory import ClusterInfo, InventoryUnavailableError
from hsmbridge.keystore.lifecycle import StoreOp, require
from hsmbridge.keystore.trust import same_cluster_identity, verify_cluster_certificate
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionErrorCode, ConnectionState, CustomKeyStore, Page
from hsmbridge.request import RequestContext
from hsmbridge.service import rotation
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.login_budget import LoginBudgetSpentError

log = logging.getLogger(__name__)
C = ConnectionState

# Called after a store reaches CONNECTED, with the store id: crash recovery hooks in here.
OnConnected = Callable[[str], None]


class KeyStoreService:
    def __init__(
        self, ctx: ServiceContext, executor: Executor | None = None, *, synchronous: bool = False
    ) -> None:
        self._ctx = ctx
        self._synchronous = synchronous
        self._executor = executor or ThreadPoolExecutor(2, thread_name_prefix="connect")
        self.on_connected: OnConnected | None = None
        self._connecting_lock = threading.Lock()
        self._connecting: set[str] = set()  # stores whose connect this process is finishing

    # -- cluster facts ------------------------------------------------------------------------
    def _describe_cluster(self, cluster_id: str) -> ClusterInfo | None:
        return self._ctx.clusters.describe(cluster_id)

    def _require_cluster(self, cluster_id: str, op: quorum.Operation) -> ClusterInfo:
        cluster = self._describe_cluster(cluster_id)
        if cluster is None or self._ctx.settings.binding(cluster_id) is None:
            where = "the cluster inventory" if cluster is None else "hsmbridge's [[clusters]]"
            raise CloudHsmClusterNotFoundException(
                f"AWS CloudHSM cluster {cluster_id} was not found in {where}. Check the cluster ID."
            )
        self._ctx.clusters.require_quorum(op, cluster)
        return cluster

    # -- Create -------------------------------------------------------------------------------
    def create(
        self, caller: RequestContext, name: str, cluster_id: str, trust_anchor: str, password: str
    ) -> str:
        """CreateCustomKeyStore. https://docs.aws.amazon.com/kms/latest/APIReference/API_CreateCustomKeyStore.html

        Raises CustomKeyStoreNameInUse, CloudHsmClusterNotFound/NotActive/InUse/
        InvalidConfiguration, IncorrectTrustAnchor, LimitExceeded.
        """
        self._ctx.authorize(caller, "kms:CreateCustomKeyStore")
        self._ctx.require_home_account(caller, "kms:CreateCustomKeyStore")
        _check_password(password)
        ctx = self._ctx
        with ctx.meta.write():
            existing = ctx.meta.get_key_store_by_name(name)
            if existing is not None:
                if self._is_identical(existing, cluster_id, trust_anchor, password):
                    return existing.store.store_id  # KMS: silently idempotent
                raise CustomKeyStoreNameInUseException(
                    f"A custom key store named {name!r} already exists in this account and Region."
                )
            if ctx.meta.count_key_stores() >= ctx.settings.custom_key_store_limit:
                raise LimitExceededException(
                    f"This account already has {ctx.settings.custom_key_store_limit} custom key "
                    "stores, the quota for an account and Region."
                )
            cluster = self._require_cluster(cluster_id, quorum.Operation.CREATE_CUSTOM_KEY_STORE)
            self._require_cluster_unused(cluster)
            verify_cluster_certificate(trust_anchor, _cluster_cert(cluster))
            store_id = ids.new_custom_key_store_id()
            store = CustomKeyStore(
                store_id=store_id,
                name=name,
                cluster_id=cluster_id,
                trust_anchor_pem=trust_anchor,
                connection_state=C.DISCONNECTED,
                creation_date=ctx.clock(),
            )
            ctx.meta.put_key_store(StoredKeyStore(store, ctx.vault.seal(password, store_id)))
        log.info("created custom key store %s on cluster %s", store_id, cluster_id)
        return store_id

    def _is_identical(
        self, row: StoredKeyStore, cluster_id: str, trust_anchor: str, password: str
    ) -> bool:
        s = row.store
        return (
            s.connection_state is C.DISCONNECTED
            and s.cluster_id == cluster_id
            and s.trust_anchor_pem.strip() == trust_anchor.strip()
            and self._ctx.password_of(row) == password
        )

    def _require_cluster_unused(self, cluster: ClusterInfo, ignore: str | None = None) -> None:
        for row in self._ctx.meta.list_key_stores(10_000, None):
            other = row.store
            if other.store_id == ignore:
                continue
            if other.cluster_id == cluster.cluster_id or self._shares_backup_history(
                other.cluster_id, cluster
            ):
                raise CloudHsmClusterInUseException(
                    f"Cluster {cluster.cluster_id} (or a cluster that shares its backup history) "
                    f"is already associated with custom key store {other.store_id}."
                )

    def _shares_backup_history(self, other_cluster_id: str, cluster: ClusterInfo) -> bool:
        other = self._describe_cluster(other_cluster_id)
        if other is None or not other.cluster_certificate_pem:
            return False
        mine = cluster.cluster_certificate_pem
        return bool(mine) and same_cluster_identity(other.cluster_certificate_pem, mine or "")

    # -- Describe -----------------------------------------------------------------------------
    def describe(
        self,
        caller: RequestContext,
        store_id: str | None = None,
        name: str | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> Page[CustomKeyStore]:
        """DescribeCustomKeyStores. https://docs.aws.amazon.com/kms/latest/APIReference/API_DescribeCustomKeyStores.html"""
        ctx = self._ctx
        ctx.authorize(caller, "kms:DescribeCustomKeyStores")
        if ctx.is_foreign(caller):
            # Custom key stores are never shared across accounts; the caller's own
            # account holds none at this endpoint.
            if store_id is not None or name is not None:
                raise CustomKeyStoreNotFoundException("No custom key store has that ID or name.")
            return Page(())
        if store_id is not None and name is not None:
            raise ValidationException(
                "Specify either CustomKeyStoreId or CustomKeyStoreName, not both."
            )
        if store_id is not None or name is not None:
            row = (
                ctx.meta.get_key_store(store_id)
                if store_id
                else ctx.meta.get_key_store_by_name(name or "")
            )
            if row is None:
                what = f"ID {store_id}" if store_id else f"name {name!r}"
                raise CustomKeyStoreNotFoundException(f"No custom key store has the {what}.")
            return Page((row.store,))
        size = limit or 1000  # NOTE: KMS's default Limit is [U]; all stores fit in one page.
        after = _decode_marker(marker)
        rows = ctx.meta.list_key_stores(size + 1, after)
        items = tuple(r.store for r in rows[:size])
        more = len(rows) > size
        return Page(items, _encode_marker(items[-1].store_id) if more else None)

    # -- Connect ------------------------------------------------------------------------------
    def connect(self, caller: RequestContext, store_id: str) -> None:
        """ConnectCustomKeyStore: returns once the connection has *started*.

        Raises CustomKeyStoreNotFound, CustomKeyStoreInvalidState (FAILED, DISCONNECTING),
        CloudHsmClusterNotActive. Everything else ends as FAILED + ConnectionErrorCode.
        """
        ctx = self._ctx
        ctx.authorize(caller, "kms:ConnectCustomKeyStore")
        ctx.require_home_account(caller, "kms:ConnectCustomKeyStore")
        with ctx.meta.write():
            row = ctx.store_row(store_id)
            state = row.store.connection_state
            require(StoreOp.CONNECT, store_id, state)
            if state in (C.CONNECTED, C.CONNECTING):
                return  # NOTE: undocumented in KMS; a no-op, as the model's wording allows
            cluster = self._describe_cluster(row.store.cluster_id)
            if cluster is not None and cluster.state != "ACTIVE":
                raise CloudHsmClusterNotActiveException(
                    f"Cluster {cluster.cluster_id} is {cluster.state}; it must be ACTIVE."
                )
            self._set_state(row, C.CONNECTING, None)
        with self._connecting_lock:
            self._connecting.add(store_id)
        if self._synchronous:
            self._finish_connect(store_id)
        else:
            self._executor.submit(self._finish_connect, store_id)

    def connecting_here(self) -> set[str]:
        """Stores whose connect this process has started and not finished."""
        with self._connecting_lock:
            return set(self._connecting)

    def _finish_connect(self, store_id: str) -> None:
        try:
            self._finish_connect_unmarked(store_id)
        finally:
            with self._connecting_lock:
                self._connecting.discard(store_id)

    def _finish_connect_unmarked(self, store_id: str) -> None:
        try:
            code = self._try_login(store_id)
        except Exception:
            log.exception("connecting custom key store %s failed unexpectedly", store_id)
            code = ConnectionErrorCode.INTERNAL_ERROR
        with self._ctx.meta.write():
            row = self._ctx.meta.get_key_store(store_id)
            abandoned = row is None or row.store.connection_state is not C.CONNECTING
            if row is not None and not abandoned:
                self._set_state(row, C.FAILED if code else C.CONNECTED, code)
        if abandoned:
            # Disconnected or deleted meanwhile. Outside the transaction: StoreConnections takes
            # its lock before metadata transactions, never after.
            self._ctx.connections.detach(store_id)
            return
        if code is None and self.on_connected is not None:
            self.on_connected(store_id)

    def _try_login(self, store_id: str) -> ConnectionErrorCode | None:  # noqa: PLR0911
        # One return per ConnectionErrorCode the connect can end with.
        ctx = self._ctx
        row = ctx.store_row(store_id)
        cluster_id = row.store.cluster_id
        try:
            cluster = ctx.inventory.describe(cluster_id)
        except InventoryUnavailableError:
            log.warning("cluster inventory unavailable while connecting %s", store_id)
            return ConnectionErrorCode.NETWORK_ERRORS
        if cluster is None:
            return ConnectionErrorCode.CLUSTER_NOT_FOUND
        verdict = quorum.check(quorum.Operation.CONNECT_CUSTOM_KEY_STORE, cluster)
        if not verdict.ok:
            log.warning("connect %s: %s", store_id, verdict.message)
            return ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS
        if ctx.settings.binding(cluster_id) is None:
            log.warning("connect %s: no [[clusters]] entry for %s", store_id, cluster_id)
            return ConnectionErrorCode.NETWORK_ERRORS
        try:
            if rotation.rotates(ctx, cluster_id):
                password = rotation.rotate_password(ctx, store_id)
            else:
                password = ctx.password_of(row)
            ctx.connections.attach(store_id, cluster_id, password)
        except LoginBudgetSpentError as exc:
            log.warning("connect %s: no login attempted: %s", store_id, exc)
            return exc.reason
        except LoginError as exc:
            # StoreConnections logged the failed attempt (a WARNING with the attempts left).
            log.info("connect %s: login as kmsuser failed: %s", store_id, exc.reason.value)
            return exc.reason
        except HsmUnreachableError as exc:
            log.warning("connect %s: HSM unreachable: %s", store_id, exc)
            return ConnectionErrorCode.NETWORK_ERRORS
        except BackendError as exc:
            log.warning("connect %s: HSM error: %s", store_id, type(exc).__name__)
            return ConnectionErrorCode.INTERNAL_ERROR
        return None

    # -- Disconnect ---------------------------------------------------------------------------
    def disconnect(self, caller: RequestContext, store_id: str) -> None:
        """DisconnectCustomKeyStore. https://docs.aws.amazon.com/kms/latest/APIReference/API_DisconnectCustomKeyStore.html

        Raises CustomKeyStoreNotFound, CustomKeyStoreInvalidState (DISCONNECTED, DISCONNECTING).
        """
        ctx = self._ctx
        ctx.authorize(caller, "kms:DisconnectCustomKeyStore")
        ctx.require_home_account(caller, "kms:DisconnectCustomKeyStore")
        with ctx.meta.write():
            row = ctx.store_row(store_id)
            require(StoreOp.DISCONNECT, store_id, row.store.connection_state)
            self._set_state(row, C.DISCONNECTING, None)
        ctx.connections.detach(store_id)
        with ctx.meta.write():
            row = ctx.store_row(store_id)
            self._set_state(row, C.DISCONNECTED, None)

    # -- Update -------------------------------------------------------------------------------
    def update(
        self,
        caller: RequestContext,
        store_id: str,
        new_name: str | None = None,
        password: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        """UpdateCustomKeyStore. https://docs.aws.amazon.com/kms/latest/APIReference/API_UpdateCustomKeyStore.html

        Raises CustomKeyStoreNotFound, CustomKeyStoreNameInUse, CustomKeyStoreInvalidState,
        CloudHsmClusterNotFound/NotRelated/NotActive/InvalidConfiguration.
        """
        self._ctx.authorize(caller, "kms:UpdateCustomKeyStore")
        self._ctx.require_home_account(caller, "kms:UpdateCustomKeyStore")
        if password is not None:
            _check_password(password)
        ctx = self._ctx
        with ctx.meta.write():
            row = ctx.store_row(store_id)
            store = row.store
            only_name = password is None and cluster_id is None
            op = StoreOp.UPDATE_NAME if only_name else StoreOp.UPDATE_SETTINGS
            require(op, store_id, store.connection_state)
            if new_name is not None and new_name != store.name:
                if ctx.meta.get_key_store_by_name(new_name) is not None:
                    raise CustomKeyStoreNameInUseException(
                        f"A custom key store named {new_name!r} already exists."
                    )
                store = replace(store, name=new_name)
            if cluster_id is not None and cluster_id != store.cluster_id:
                self._check_related_cluster(store, cluster_id)
                store = replace(store, cluster_id=cluster_id)
            blob = ctx.vault.seal(password, store_id) if password is not None else row.password_blob
            ctx.meta.put_key_store(StoredKeyStore(store, blob))
            if password is not None:
                # A new password gets a new failed-login budget (the KMS recovery runbook).
                ctx.meta.set_failed_logins(store_id, 0)

    def _check_related_cluster(self, store: CustomKeyStore, cluster_id: str) -> None:
        new = self._require_cluster(cluster_id, quorum.Operation.UPDATE_CUSTOM_KEY_STORE)
        old = self._describe_cluster(store.cluster_id)
        old_cert = old.cluster_certificate_pem if old else None
        new_cert = new.cluster_certificate_pem
        related = (
            old_cert is not None
            and new_cert is not None
            and same_cluster_identity(old_cert, new_cert)
        ) or (old is None and new_cert is not None and _anchor_signed(store, new_cert))
        if not related:
            raise CloudHsmClusterNotRelatedException(
                f"Cluster {cluster_id} does not share a backup history with cluster "
                f"{store.cluster_id} (their cluster certificates differ)."
            )
        self._require_cluster_unused(new, ignore=store.store_id)

    # -- Delete -------------------------------------------------------------------------------
    def delete(self, caller: RequestContext, store_id: str) -> None:
        """DeleteCustomKeyStore. https://docs.aws.amazon.com/kms/latest/APIReference/API_DeleteCustomKeyStore.html

        Raises CustomKeyStoreNotFound, CustomKeyStoreInvalidState, CustomKeyStoreHasCMKs.
        """
        ctx = self._ctx
        ctx.authorize(caller, "kms:DeleteCustomKeyStore")
        ctx.require_home_account(caller, "kms:DeleteCustomKeyStore")
        with ctx.meta.write():
            row = ctx.store_row(store_id)
            require(StoreOp.DELETE, store_id, row.store.connection_state)
            count = ctx.meta.count_keys_in_store(store_id)
            if count:
                raise CustomKeyStoreHasCMKsException(
                    f"Custom key store {store_id} still holds {count} KMS key(s), including keys "
                    "pending deletion. Delete them and wait out their waiting periods first."
                )
            ctx.meta.delete_key_store(store_id)

    # -- helpers ------------------------------------------------------------------------------
    def _set_state(
        self, row: StoredKeyStore, state: ConnectionState, code: ConnectionErrorCode | None
    ) -> None:
        store = replace(row.store, connection_state=state, connection_error_code=code)
        self._ctx.meta.put_key_store(StoredKeyStore(store, row.password_blob))

    def resume_connected(self) -> None:
        """At start-up: finish transitions a crash interrupted (CONNECTING, DISCONNECTING)."""
        for row in self._ctx.meta.list_key_stores(10_000, None):
            self.finish_interrupted(row.store.store_id)

    def finish_interrupted(self, store_id: str) -> None:
        """Finish a connect (log in, then CONNECTED or FAILED) or a disconnect (DISCONNECTED)
        that a process which died, or is gone, left half done; anything else is left as it is."""
        row = self._ctx.meta.get_key_store(store_id)
        if row is None:
            return
        if row.store.connection_state is C.CONNECTING:
            log.info("finishing the interrupted connect of custom key store %s", store_id)
            self._finish_connect(store_id)
        elif row.store.connection_state is C.DISCONNECTING:
            with self._ctx.meta.write():
                row = self._ctx.meta.get_key_store(store_id)
                if row is not None and row.store.connection_state is C.DISCONNECTING:
                    self._set_state(row, C.DISCONNECTED, None)

    def close(self) -> None:
        if isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=True, cancel_futures=False)


def _check_password(password: str) -> None:
    # The edge checks the model's 7-32 length; the CLI calls the service directly, so check here.
    if not 7 <= len(password) <= 32:
        raise ValidationException("KeyStorePassword must be 7 to 32 characters long.")


def _cluster_cert(cluster: ClusterInfo) -> str:
    if not cluster.cluster_certificate_pem:
        raise CloudHsmClusterInvalidConfigurationException(
            f"Cluster {cluster.cluster_id} reports no ClusterCertificate; initialize the cluster."
        )
    return cluster.cluster_certificate_pem


def _anchor_signed(store: CustomKeyStore, cluster_cert: str) -> bool:
    try:
        verify_cluster_certificate(store.trust_anchor_pem, cluster_cert)
    except Exception:
        return False
    return True


def _encode_marker(last_id: str) -> str:
    return last_id


def _decode_marker(marker: str | None) -> str | None:
    from hsmbridge.errors import InvalidMarkerException

    if marker is None:
        return None
    if not (marker.startswith("cks-") and len(marker) <= 64):
        raise InvalidMarkerException("The Marker is not one that DescribeCustomKeyStores returned.")
    return marker
