"""This process's live HSM logins, one per connected custom key store.

Owns: the map from custom key store id to a logged-in `HsmBackend`. The metadata store is the
truth about whether a store is CONNECTED; this registry follows it lazily. A process that finds a
store CONNECTED but holds no login (the CLI connected it, or this server restarted) logs in on first
use; a process holding a login for a store that is no longer CONNECTED closes it. PKCS#11 logins are
per process, so every process keeps its own registry.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hsmbridge.backend import HsmBackend, HsmConnector

log = logging.getLogger(__name__)


@dataclass
class _Live:
    cluster_id: str
    backend: HsmBackend


class StoreConnections:
    def __init__(self, connector: HsmConnector) -> None:
        self._connector = connector
        self._live: dict[str, _Live] = {}
        # WARNING: held while logging in, so two threads never log in to one token at once
        # (a second C_Login on the token leaks a session).
        self._lock = threading.Lock()

    def attach(self, store_id: str, cluster_id: str, password: str) -> HsmBackend:
        """Log in for this store (replacing any previous login); raises BackendError."""
        with self._lock:
            self._close_locked(store_id)
            backend = self._connector.connect(cluster_id, password)
            self._live[store_id] = _Live(cluster_id, backend)
            return backend

    def get(self, store_id: str, cluster_id: str, password: Callable[[], str]) -> HsmBackend:
        """The live login for a store the metadata says is CONNECTED; logs in if needed."""
        live = self._live.get(store_id)
        if live is not None and live.cluster_id == cluster_id:
            return live.backend
        with self._lock:
            live = self._live.get(store_id)
            if live is not None and live.cluster_id == cluster_id:
                return live.backend
            self._close_locked(store_id)
            backend = self._connector.connect(cluster_id, password())
            self._live[store_id] = _Live(cluster_id, backend)
            log.info("logged in to cluster %s for custom key store %s", cluster_id, store_id)
            return backend

    def peek(self, store_id: str) -> HsmBackend | None:
        live = self._live.get(store_id)
        return live.backend if live else None

    def detach(self, store_id: str) -> None:
        with self._lock:
            self._close_locked(store_id)

    def close_all(self) -> None:
        with self._lock:
            for store_id in list(self._live):
                self._close_locked(store_id)

    def live_store_ids(self) -> list[str]:
        return list(self._live)

    def _close_locked(self, store_id: str) -> None:
        live = self._live.pop(store_id, None)
        if live is None:
            return
        try:
            live.backend.close()
        except Exception:  # closing must never stop a disconnect
            log.exception("closing the HSM login of custom key store %s failed", store_id)
