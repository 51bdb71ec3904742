"""The login watch: this process's HSM logins follow the shared connection state.

Owns: `LoginWatch`. Every process serving from a metadata database holds its own kmsuser logins
(PKCS#11 logins are per process); the metadata says which stores are CONNECTED. A store
disconnected (or deleted) through another process or instance is refused here at once, since
every request reads the store row, but the login itself stayed open until a request touched the
store. That leaves kmsuser logged in to the cluster after the operator disconnected it, which
CloudHSM reports as `USER_LOGGED_IN` when the store is connected again. The watch closes, every
`interval_s`, the logins of stores the metadata no longer shows CONNECTED or CONNECTING, so a
disconnect through any instance closes every instance's login within one interval. It never
logs in.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from hsmbridge.errors import HsmbridgeError
from hsmbridge.model import ConnectionState
from hsmbridge.service.context import ServiceContext

log = logging.getLogger(__name__)

WATCH_INTERVAL_S: Final = 2.0
# A CONNECTING store's login may be the one its connect just made, in this very process.
_KEEP_LOGIN: Final = frozenset({ConnectionState.CONNECTED, ConnectionState.CONNECTING})


class LoginWatch:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch_once(self) -> int:
        """Close this process's logins of stores no longer CONNECTED; how many it closed.

        Reads outside any metadata write, then takes the connections lock: the lock order of
        `StoreConnections` (its lock before metadata transactions, never inside one)."""
        connections = self._ctx.connections
        closed = 0
        for store_id in connections.live_store_ids():
            # Taken before the read: a login made after it (a connect, or a first use that saw
            # CONNECTED) is another object and survives this round.
            login = connections.peek(store_id)
            row = self._ctx.meta.get_key_store(store_id)
            if row is not None and row.store.connection_state in _KEEP_LOGIN:
                continue
            if login is not None and connections.detach_if_same(store_id, login):
                state = row.store.connection_state.value if row else "deleted"
                log.info("closed the HSM login of custom key store %s: it is %s", store_id, state)
                closed += 1
        return closed

    def start(self, interval_s: float) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="login-watch", daemon=True
        )
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        failing = False
        while not self._stop.wait(interval_s):
            try:
                self.watch_once()
                failing = False
            except HsmbridgeError as exc:  # the metadata database unavailable: next round
                if not failing:
                    log.warning("login watch failed (%s); retrying every %g s", exc, interval_s)
                failing = True
            except Exception:
                log.exception("login watch failed; retrying next interval")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
