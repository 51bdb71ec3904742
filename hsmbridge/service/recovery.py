"""Crash recovery: finish or roll back whatever an interrupted process left, and keep doing so.

Owns: `Recovery`. At start-up (`recover_all`) it finishes interrupted connects and disconnects,
rolls back every CreateKey intent (nothing else is serving yet; on a database several instances
share, only intents too old to be another instance's request in flight) and finishes
interrupted and due deletions. After a connect (`after_connect`) and on every sweep
(`sweep_once`, run periodically; only the maintenance holder acts) it does the same for
intents old enough that no live request can own them, and retries failed CreateKey clean-ups.
Rolling back a CreateKey destroys the HSM key labelled with its ARN and removes the intent row;
on HSMs that can leave a nameless, empty key object when killed mid-generation (the profile says
so), the backend removes those too.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging

from hsmbridge.model import ConnectionState, KeyLifecycle
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.deletion import KeyDeletion
from hsmbridge.service.hsm import HsmGateway
from hsmbridge.service.keys import KeyService
from hsmbridge.service.keystores import KeyStoreService

log = logging.getLogger(__name__)

# A CreateKey holds its intent for one HSM key generation (milliseconds; seconds when an HSM is
# throttling and retried): intents younger than this may still belong to a live request.
IN_FLIGHT_GRACE_S = 60.0
STALE_INTENT_S = 300.0


class Recovery:
    def __init__(
        self,
        ctx: ServiceContext,
        hsm: HsmGateway,
        keys: KeyService,
        keystores: KeyStoreService,
        deletions: KeyDeletion,
    ) -> None:
        self._ctx = ctx
        self._hsm = hsm
        self._keys = keys
        self._keystores = keystores
        self._deletions = deletions
        # Stores seen CONNECTING or DISCONNECTING by the previous sweep (see _finish_stalled).
        self._in_transition: set[str] = set()

    def recover_all(self) -> None:
        """At start-up, before this process (or any worker) serves a request.

        On a database other instances serve from (`meta.shared`), a young intent may be their
        CreateKey in flight: it is spared, as after a connect, and a dead instance's is rolled
        back by the sweep once stale."""
        meta = self._ctx.meta
        grace_s = IN_FLIGHT_GRACE_S if meta.shared else 0.0
        # Deletions are finished by one process per database: the maintenance holder's.
        maintains = meta.hold_maintenance()
        self._keystores.resume_connected()
        for store_id in self._connected_stores():
            self._recover_quietly(store_id, grace_s, finish_deletions=maintains)
        if maintains:
            self._deletions.sweep()

    def after_connect(self, store_id: str) -> None:
        # Other processes may already be serving this store: spare intents a live request owns.
        self._recover_quietly(store_id, IN_FLIGHT_GRACE_S)

    def sweep_once(self) -> bool:
        """One maintenance pass: failed clean-ups, due deletions, and intents too old to belong to
        a live request (a worker or instance that died mid-CreateKey), without waiting for a
        restart. Only in the maintenance holder (`MetadataStore.hold_maintenance`): on a shared
        database one process among all instances does it. False if this one did nothing."""
        if not self._ctx.meta.hold_maintenance():
            return False
        self._finish_stalled()
        self._keys.retry_abandoned()
        self._deletions.sweep()
        for store_id in self._connected_stores():
            self._recover_quietly(store_id, STALE_INTENT_S)
        return True

    def _finish_stalled(self) -> None:
        """A connect or disconnect whose process died (a killed worker, a lost instance) leaves
        its store CONNECTING or DISCONNECTING until some process starts. One still in
        transition at two sweeps in a row (a sweep interval apart: longer than any live connect
        takes) and not being connected by this process is finished here, by the one maintenance
        holder. Should a live connect elsewhere still be at it, both log in and record the same
        outcome."""
        pending = {
            row.store.store_id
            for row in self._ctx.meta.list_key_stores(10_000, None)
            if row.store.connection_state
            in (ConnectionState.CONNECTING, ConnectionState.DISCONNECTING)
        }
        stalled = (pending & self._in_transition) - self._keystores.connecting_here()
        self._in_transition = pending
        for store_id in sorted(stalled):
            try:
                self._keystores.finish_interrupted(store_id)
            except Exception:  # retried at the next sweep
                log.exception("finishing the transition of custom key store %s failed", store_id)

    def recover_store(
        self, store_id: str, *, in_flight_grace_s: float = 0.0, finish_deletions: bool = True
    ) -> int:
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
        ours = self._keys.in_flight()
        creating = [
            r
            for r in self._ctx.meta.keys_in_store(store_id, KeyLifecycle.CREATING)
            if r.key_id not in ours and (not in_flight_grace_s or r.creation_date <= cutoff)
        ]
        for record in creating:
            backend = self._hsm.login(row)
            with self._hsm.translated(record.arn):
                backend.destroy_key(record.arn)
            with self._ctx.meta.write():
                self._ctx.meta.delete_key(record.key_id)
            log.info("recovery: rolled back interrupted CreateKey %s", record.key_id)
            fixed += 1
        if creating:
            backend = self._hsm.login(row)
            with self._hsm.translated():
                fixed += backend.destroy_incomplete_keys()
        if not finish_deletions:
            return fixed
        for record in self._ctx.meta.keys_in_store(store_id, KeyLifecycle.DELETING):
            self._deletions.finish(record)
            fixed += 1
        return fixed

    def _connected_stores(self) -> list[str]:
        return [
            row.store.store_id
            for row in self._ctx.meta.list_key_stores(10_000, None)
            if row.store.connection_state is ConnectionState.CONNECTED
        ]

    def _recover_quietly(
        self, store_id: str, grace_s: float = 0.0, *, finish_deletions: bool = True
    ) -> None:
        try:
            fixed = self.recover_store(
                store_id, in_flight_grace_s=grace_s, finish_deletions=finish_deletions
            )
        except Exception:  # recovery is retried at the next connect, sweep or start
            log.exception("recovery of custom key store %s failed; will retry", store_id)
            return
        if fixed:
            log.info("recovery fixed %d interrupted key operation(s) in %s", fixed, store_id)
