"""This process's live HSM logins, one per connected custom key store.

Owns: the map from custom key store id to a logged-in `HsmBackend`. The metadata store is the
truth about whether a store is CONNECTED; this registry follows it lazily. A process that finds a
store CONNECTED but holds no login (the CLI connected it, or this server restarted) logs in on first
use; a process holding a login for a store that is no longer CONNECTED closes it when a request
touches the store, or at the latest at the next round of the login watch (`service.login_watch`).
PKCS#11 logins are per process, so every process keeps its own registry.

Failed logins: every C_Login is first reserved in the store's failed-login budget
(`LoginBudget`, shared by all processes through the metadata), and after a failed one the lazy
login of that store waits out an exponential backoff in this process (1 s, 2 s, 4 s ... 60 s),
failing at once with the same kind of LoginError meanwhile, without touching the HSM. An explicit
`attach` (ConnectCustomKeyStore) ignores the backoff but not the budget; a success clears both.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hsmbridge import deadline, nowait
from hsmbridge.backend import DeadlineExceededError, HsmBackend, HsmConnector, LoginError
from hsmbridge.model import ConnectionErrorCode
from hsmbridge.service.login_budget import LoginBudget

log = logging.getLogger(__name__)

Monotonic = Callable[[], float]
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


class LoginBackedOffError(LoginError):
    """No login was attempted: the last one for this store failed too recently."""


@dataclass
class _Live:
    cluster_id: str
    backend: HsmBackend


@dataclass(frozen=True)
class _Backoff:
    failures: int  # in a row, in this process
    until: float  # monotonic time of the next allowed attempt
    reason: ConnectionErrorCode


class StoreConnections:
    def __init__(
        self,
        connector: HsmConnector,
        budget: LoginBudget | None = None,
        monotonic: Monotonic = time.monotonic,
    ) -> None:
        self._connector = connector
        self._budget = budget  # None: nothing counted (tests that swap in their own connector)
        self._monotonic = monotonic
        self._live: dict[str, _Live] = {}
        self._backoff: dict[str, _Backoff] = {}
        # WARNING: held while logging in, so two threads never log in to one token at once
        # (a second C_Login on the token leaks a session). Also held across the budget's
        # metadata write transactions: never call into this class inside `meta.write()`.
        self._lock = threading.Lock()

    def attach(self, store_id: str, cluster_id: str, password: str) -> HsmBackend:
        """Log in for this store (replacing any previous login); raises BackendError."""
        with self._lock:
            self._close_locked(store_id)
            return self._log_in_locked(store_id, cluster_id, lambda: password)

    def change_password(self, store_id: str, cluster_id: str, old: str, new: str) -> None:
        """Change kmsuser's password in the cluster (the store's rotation at connect). The tool
        logs in with `old`, so it is counted like a login in the failed-login budget; this
        process holds no login of the store meanwhile (the tool would see kmsuser logged in).
        Raises LoginError (with the KMS reason) or BackendError."""
        with self._lock:
            self._close_locked(store_id)
            attempt = self._budget.reserve(store_id, cluster_id) if self._budget else None
            try:
                self._connector.change_password(cluster_id, old, new)
            except BaseException as exc:
                left = self._budget.settle(attempt, exc) if self._budget and attempt else None
                if isinstance(exc, LoginError):
                    self._failed_locked(store_id, exc, left, back_off=False)
                raise
            if self._budget and attempt:
                self._budget.settle(attempt, None)

    def get(self, store_id: str, cluster_id: str, password: Callable[[], str]) -> HsmBackend:
        """The live login for a store the metadata says is CONNECTED; logs in if needed.

        Raises LoginBackedOffError while a failed login's backoff lasts, LoginBudgetSpentError
        when the store's failed-login budget is used up, else what the connector raises."""
        live = self._live.get(store_id)
        if live is not None and live.cluster_id == cluster_id:
            return live.backend
        nowait.refuse("logging in to the store's HSM")
        # Logins are made one at a time; a request waits for another's no longer than its
        # deadline, and one whose deadline has passed never starts a C_Login.
        left = deadline.remaining()
        if not self._lock.acquire(timeout=-1 if left is None else max(0.0, left)):
            raise DeadlineExceededError("the request's deadline passed while a login was made")
        try:
            live = self._live.get(store_id)
            if live is not None and live.cluster_id == cluster_id:
                return live.backend
            if deadline.expired():
                raise DeadlineExceededError("the request's deadline passed before its login")
            self._close_locked(store_id)
            self._check_backoff_locked(store_id)
            backend = self._log_in_locked(store_id, cluster_id, password, back_off=True)
            log.info("logged in to cluster %s for custom key store %s", cluster_id, store_id)
            return backend
        finally:
            self._lock.release()

    def _log_in_locked(
        self,
        store_id: str,
        cluster_id: str,
        password: Callable[[], str],
        *,
        back_off: bool = False,
    ) -> HsmBackend:
        secret = password()
        attempt = self._budget.reserve(store_id, cluster_id) if self._budget else None
        try:
            backend = self._connector.connect(cluster_id, secret)
        except BaseException as exc:
            left = self._budget.settle(attempt, exc) if self._budget and attempt else None
            if isinstance(exc, LoginError):
                self._failed_locked(store_id, exc, left, back_off=back_off)
            raise
        finally:
            del secret  # WARNING: the password lives no longer than the login needs it
        # Kept before the count is reset: a metadata error there must not leak the login.
        self._live[store_id] = _Live(cluster_id, backend)
        self._backoff.pop(store_id, None)
        if self._budget and attempt:
            self._budget.settle(attempt, None)
        return backend

    def _failed_locked(
        self, store_id: str, exc: LoginError, left: int | None, *, back_off: bool
    ) -> None:
        # The password never reaches a log line: only the store, the reason and what is left.
        log.warning(
            "login as kmsuser for custom key store %s failed (%s); %s",
            store_id,
            exc.reason.value,
            "the HSM does not lock the user" if left is None else f"{left} attempt(s) left",
        )
        if not back_off:
            return
        previous = self._backoff.get(store_id)
        failures = previous.failures + 1 if previous else 1
        delay = min(FIRST_BACKOFF_S * 2 ** (failures - 1), MAX_BACKOFF_S)
        self._backoff[store_id] = _Backoff(failures, self._monotonic() + delay, exc.reason)

    def _check_backoff_locked(self, store_id: str) -> None:
        backoff = self._backoff.get(store_id)
        if backoff is None:
            return
        wait = backoff.until - self._monotonic()
        if wait > 0:
            raise LoginBackedOffError(
                backoff.reason,
                f"the last {backoff.failures} kmsuser login(s) for custom key store {store_id} "
                f"failed; the next attempt is allowed in {wait:.1f} s",
            )

    def peek(self, store_id: str) -> HsmBackend | None:
        live = self._live.get(store_id)
        return live.backend if live else None

    def detach(self, store_id: str) -> None:
        """Close this process's login; the backoff goes too: the store left CONNECTED, and a
        reconnect may come with a new password."""
        nowait.refuse("closing the store's HSM login")  # the lock is held across logins
        with self._lock:
            self._close_locked(store_id)
            self._backoff.pop(store_id, None)

    def detach_if_same(self, store_id: str, backend: HsmBackend) -> bool:
        """`detach`, only if the store's login is still `backend` (not one made since)."""
        with self._lock:
            live = self._live.get(store_id)
            if live is None or live.backend is not backend:
                return False
            self._close_locked(store_id)
            self._backoff.pop(store_id, None)
            return True

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
