"""The failed-login budget of each custom key store, shared by every process on one metadata store.

Owns: `LoginBudget` and `LoginBudgetSpentError`. An HSM that locks its crypto user after
`login_lockout_threshold` failed logins in a row (CloudHSM: 5, then an officer must reset it)
would be locked by hsmbridge itself if every request retried a stale kmsuser password. So each
C_Login is reserved in a metadata write transaction *before* it is made (the count goes up by
one), and at most threshold - 1 reservations are ever handed out between two successes: whatever
the number of server processes and CLIs, the attempt that would reach the threshold is never made.
Settling the attempt resets the count on success, keeps it on bad credentials and gives the
reservation back for any other failure (network, HSM unreachable), which the HSM does not count.
When the last attempt has failed, a CONNECTED store goes FAILED with INVALID_CREDENTIALS, so every
process stops using it; only UpdateCustomKeyStore with a new KeyStorePassword resets the count.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from hsmbridge.backend import LoginError
from hsmbridge.config import Settings
from hsmbridge.metadata.store import MetadataStore, StoredKeyStore
from hsmbridge.model import ConnectionErrorCode, ConnectionState

log = logging.getLogger(__name__)
_BAD_CREDENTIALS = ConnectionErrorCode.INVALID_CREDENTIALS


class LoginBudgetSpentError(LoginError):
    """No login was attempted: the store's failed-login budget is used up."""

    def __init__(self, store_id: str, failures: int) -> None:
        super().__init__(
            _BAD_CREDENTIALS,
            f"kmsuser logins for custom key store {store_id} failed {failures} times in a row; "
            "hsmbridge does not try again before the HSM would lock the user. Disconnect the "
            "store, update its KeyStorePassword and connect it again.",
        )


@dataclass(frozen=True)
class Attempt:
    """One reserved login attempt; `limit` None: the HSM never locks, nothing was counted."""

    store_id: str
    number: int  # this attempt's place in the run of failures (1 = the first since a success)
    limit: int | None


class LoginBudget:
    def __init__(self, meta: MetadataStore, settings: Settings) -> None:
        self._meta = meta
        self._settings = settings

    def _limit(self, cluster_id: str) -> int | None:
        """Failed logins in a row allowed for the cluster's HSM; None: unlimited."""
        binding = self._settings.binding(cluster_id)
        threshold = binding.profile.login_lockout_threshold if binding is not None else 0
        return threshold - 1 if threshold else None

    def reserve(self, store_id: str, cluster_id: str) -> Attempt:
        """Count the login about to be made; raises LoginBudgetSpentError (no login then)."""
        limit = self._limit(cluster_id)
        if limit is None:
            return Attempt(store_id, 0, None)
        with self._meta.write():
            used = self._meta.failed_logins(store_id)
            if used >= limit:
                self._stop(store_id)
                raise LoginBudgetSpentError(store_id, used)
            self._meta.set_failed_logins(store_id, used + 1)
        return Attempt(store_id, used + 1, limit)

    def settle(self, attempt: Attempt, error: BaseException | None) -> int | None:
        """Record how the attempt ended; returns the attempts left (None: unlimited)."""
        if attempt.limit is None:
            return None
        store_id = attempt.store_id
        counts = isinstance(error, LoginError) and error.reason is _BAD_CREDENTIALS
        with self._meta.write():
            used = self._meta.failed_logins(store_id)
            if error is None:
                self._meta.set_failed_logins(store_id, 0)
                return attempt.limit
            if not counts:
                # The HSM never checked the password: the reservation goes back.
                used = max(used - 1, 0)
                self._meta.set_failed_logins(store_id, used)
                return attempt.limit - used
            spent = used >= attempt.limit
            if spent:
                self._stop(store_id)
        if spent and attempt.number == attempt.limit:  # once: the attempt that spent the budget
            log.error(
                "custom key store %s: stopped logging in as kmsuser after %d failed logins in a "
                "row (the HSM locks the user at %d); disconnect the store, update its "
                "KeyStorePassword and connect it again",
                store_id,
                attempt.limit,
                attempt.limit + 1,
            )
        return max(attempt.limit - used, 0)

    def _stop(self, store_id: str) -> None:
        """A CONNECTED store goes FAILED for every process (a connect in progress ends FAILED
        by itself). Inside the caller's write transaction."""
        row = self._meta.get_key_store(store_id)
        if row is None or row.store.connection_state is not ConnectionState.CONNECTED:
            return
        store = replace(
            row.store,
            connection_state=ConnectionState.FAILED,
            connection_error_code=_BAD_CREDENTIALS,
        )
        self._meta.put_key_store(StoredKeyStore(store, row.password_blob))
