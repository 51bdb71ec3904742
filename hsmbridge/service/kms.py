"""`KmsService`: every supported KMS operation, grouped by the resource it acts on.

Owns: wiring the service components over one `ServiceContext`, start-up recovery (finish
interrupted connects, roll back interrupted CreateKeys, finish interrupted deletions), and the
background deletion sweeper. Operations live on the components (`keystores`, `keys`, `aliases`,
`tags`, `policies`, `crypto`), one method per KMS operation, so the HTTP table and the CLI call
them directly instead of through a facade that only forwards. Must not import api or cli.
"""

from __future__ import annotations

import logging
import threading
import time

from hsmbridge.audit.events import AuditSink, NullSink
from hsmbridge.backend import HsmConnector
from hsmbridge.config import Settings
from hsmbridge.keystore.inventory import inventory_from_settings
from hsmbridge.keystore.passwords import PasswordVault
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.metadata.store import MetadataStore
from hsmbridge.model import ConnectionState
from hsmbridge.service.aliases import AliasService
from hsmbridge.service.connections import StoreConnections
from hsmbridge.service.context import Clock, ServiceContext
from hsmbridge.service.crypto import CryptoService
from hsmbridge.service.keys import KeyService
from hsmbridge.service.keystores import KeyStoreService
from hsmbridge.service.lookup import KeyLookup
from hsmbridge.service.policies import PolicyService
from hsmbridge.service.tags import TagService

log = logging.getLogger(__name__)

# A CreateKey holds its intent for one HSM key generation (milliseconds; seconds when an HSM is
# throttling and retried): intents younger than this may still belong to a live request.
IN_FLIGHT_GRACE_S = 60.0
STALE_INTENT_S = 300.0


class KmsService:
    def __init__(self, ctx: ServiceContext, *, synchronous_connect: bool = False) -> None:
        self.ctx = ctx
        self.lookup = KeyLookup(ctx)
        self.keystores = KeyStoreService(ctx, synchronous=synchronous_connect)
        self.keys = KeyService(ctx, self.lookup)
        self.aliases = AliasService(ctx, self.lookup)
        self.tags = TagService(ctx, self.lookup)
        self.policies = PolicyService(ctx, self.lookup)
        self.crypto = CryptoService(ctx, self.lookup, self.keys)
        self.keystores.on_connected = self._recover_after_connect
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(self, sweep_interval_s: float | None = 60.0, *, recover: bool = True) -> None:
        """Recover what a crash left, then (optionally) sweep expired deletions periodically.

        `recover=False` is for the worker processes of a multi-process server: recovery rolls
        back every CreateKey it finds in flight, so it must run in one process while no other
        serves (the supervisor, before it starts workers), and so must the sweeper.
        """
        if recover:
            self._recover_all()
        if sweep_interval_s:
            self._sweeper = threading.Thread(
                target=self._sweep_loop,
                args=(sweep_interval_s,),
                name="deletion-sweeper",
                daemon=True,
            )
            self._sweeper.start()

    def _recover_all(self) -> None:
        self.keystores.resume_connected()
        for row in self.ctx.meta.list_key_stores(10_000, None):
            if row.store.connection_state is ConnectionState.CONNECTED:
                self._recover_quietly(row.store.store_id)
        self.keys.sweep_deletions()

    def _recover_after_connect(self, store_id: str) -> None:
        # Other processes may already be serving this store: spare intents a live request owns.
        self._recover_quietly(store_id, IN_FLIGHT_GRACE_S)

    def _recover_quietly(self, store_id: str, grace_s: float = 0.0) -> None:
        try:
            fixed = self.keys.recover_store(store_id, in_flight_grace_s=grace_s)
        except Exception:  # recovery is retried at the next connect or start
            log.exception("recovery of custom key store %s failed; will retry", store_id)
            return
        if fixed:
            log.info("recovery fixed %d interrupted key operation(s) in %s", fixed, store_id)

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.keys.sweep_deletions()
                # A worker that died mid-CreateKey leaves an intent nobody will finish: roll
                # back intents too old to belong to a live request, without waiting for a restart.
                for row in self.ctx.meta.list_key_stores(10_000, None):
                    if row.store.connection_state is ConnectionState.CONNECTED:
                        self._recover_quietly(row.store.store_id, STALE_INTENT_S)
            except Exception:
                log.exception("deletion sweep failed; retrying next interval")

    def close(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        self.keystores.close()
        self.ctx.connections.close_all()
        self.ctx.meta.close()


def open_service(
    settings: Settings,
    connector: HsmConnector,
    *,
    clock: Clock = time.time,
    audit: AuditSink | None = None,
    meta: MetadataStore | None = None,
    synchronous_connect: bool = False,
) -> KmsService:
    """Build a KmsService over the configured metadata DB, inventory and password vault."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ctx = ServiceContext(
        settings=settings,
        meta=meta or SqliteMetadataStore(settings.metadata_db),
        inventory=inventory_from_settings(settings.inventory),
        vault=PasswordVault(settings.master_key_file),
        connections=StoreConnections(connector),
        clock=clock,
        audit=audit or NullSink(),
    )
    return KmsService(ctx, synchronous_connect=synchronous_connect)
