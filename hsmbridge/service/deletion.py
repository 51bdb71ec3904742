"""The end of a KMS key's waiting period: destroy its HSM material, then forget the key.

Owns: `KeyDeletion`. `sweep()` deletes every key whose deletion date has passed; `finish()`
deletes one. The row is flipped to DELETING before the material is destroyed, so a crash in
between is finished by recovery. A store that is not CONNECTED cannot reach its HSM: the key is
deleted anyway and its material left as a recorded orphan (a tombstone with
material_deleted=False and a DeleteKey event with FAILURE), as KMS does.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from hsmbridge.backend import BackendError
from hsmbridge.errors import KmsError
from hsmbridge.metadata.store import DeletedKey
from hsmbridge.model import ConnectionState, KeyLifecycle, KeyRecord, KeyState
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm import HsmGateway
from hsmbridge.trail.events import SERVICE_EVENT, AuditEvent

log = logging.getLogger(__name__)


class KeyDeletion:
    def __init__(self, ctx: ServiceContext, hsm: HsmGateway) -> None:
        self._ctx = ctx
        self._hsm = hsm

    def sweep(self) -> int:
        """Delete every key whose waiting period is over; returns how many went."""
        done = 0
        for record in self._ctx.meta.keys_due_for_deletion(self._ctx.clock()):
            try:
                self.finish(record)
                done += 1
            except (BackendError, KmsError) as exc:
                log.warning("deletion of %s postponed: %s", record.key_id, type(exc).__name__)
        return done

    def finish(self, record: KeyRecord) -> None:
        """Delete one due key (a PendingDeletion row past its date, or a DELETING row)."""
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
            backend = self._hsm.login(row)
            with self._hsm.translated(record.arn):
                destroyed = backend.destroy_key(record.arn)
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
                    "eventType": SERVICE_EVENT,
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
