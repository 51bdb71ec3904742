"""`KmsService`: every supported KMS operation, grouped by the resource it acts on.

Owns: wiring the service components over one `ServiceContext` (each operation's component, the
HSM gateway they share, recovery and deletion), the background sweeper thread that runs
`Recovery.sweep_once` in the process that owns maintenance, and the login watch every process
runs (`service.login_watch`). Operations live on the components (`keystores`, `keys`, `aliases`,
`tags`, `policies`, `crypto`, `grants`), one method per KMS operation, each taking the caller's
`RequestContext` first, so the protocol's operation table calls them
directly instead of through a facade that only forwards. It receives its dependencies in the
`ServiceContext` (`hsmbridge.bootstrap` builds it) and names no metadata engine. Must not import
api, cli or bootstrap.
"""

from __future__ import annotations

import logging
import threading

from hsmbridge.service.aliases import AliasService
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.crypto import CryptoService
from hsmbridge.service.deletion import KeyDeletion
from hsmbridge.service.grants import GrantService
from hsmbridge.service.hsm import HsmGateway
from hsmbridge.service.keys import KeyService
from hsmbridge.service.keystores import KeyStoreService
from hsmbridge.service.login_watch import WATCH_INTERVAL_S, LoginWatch
from hsmbridge.service.lookup import KeyLookup
from hsmbridge.service.policies import PolicyService
from hsmbridge.service.recovery import Recovery
from hsmbridge.service.tags import TagService

log = logging.getLogger(__name__)


class KmsService:
    def __init__(self, ctx: ServiceContext, *, synchronous_connect: bool = False) -> None:
        self.ctx = ctx
        self.hsm = HsmGateway(ctx)
        self.lookup = KeyLookup(ctx)
        self.keystores = KeyStoreService(ctx, synchronous=synchronous_connect)
        self.keys = KeyService(ctx, self.lookup, self.hsm)
        self.aliases = AliasService(ctx, self.lookup)
        self.tags = TagService(ctx, self.lookup)
        self.policies = PolicyService(ctx, self.lookup)
        self.crypto = CryptoService(ctx, self.lookup, self.hsm)
        self.grants = GrantService(ctx, self.lookup)
        self.deletions = KeyDeletion(ctx, self.hsm)
        self.recovery = Recovery(ctx, self.hsm, self.keys, self.keystores, self.deletions)
        self.keystores.on_connected = self.recovery.after_connect
        self.login_watch = LoginWatch(ctx)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(
        self,
        sweep_interval_s: float | None = 60.0,
        *,
        recover: bool = True,
        watch_interval_s: float | None = WATCH_INTERVAL_S,
    ) -> None:
        """Recover what a crash left, then (optionally) sweep expired deletions periodically;
        in every process, close the logins of stores disconnected elsewhere every
        `watch_interval_s` (None: never; `service.login_watch`).

        `recover=False` is for the worker processes of a multi-process server: recovery rolls
        back every CreateKey it finds in flight, so it must run in one process while no other
        serves (the supervisor, before it starts workers), and so must the sweeper.
        """
        if recover:
            self.recovery.recover_all()
        if watch_interval_s:
            self.login_watch.start(watch_interval_s)
        if sweep_interval_s:
            self._sweeper = threading.Thread(
                target=self._sweep_loop,
                args=(sweep_interval_s,),
                name="deletion-sweeper",
                daemon=True,
            )
            self._sweeper.start()

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.recovery.sweep_once()
            except Exception:
                log.exception("deletion sweep failed; retrying next interval")

    def close(self) -> None:
        self.login_watch.stop()
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        self.keystores.close()
        self.ctx.connections.close_all()
        self.ctx.meta.close()
