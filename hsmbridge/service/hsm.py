"""The one way the service reaches a custom key store's HSM.

Owns: `HsmGateway`. Every operation that touches an HSM gets its logged-in backend here and makes
its backend calls inside `translated()`, so the rules live in one place: a key's store must be
CONNECTED (else the key is Unavailable: KMSInvalidStateException), the live login of the store
is reused or made on first use with the store's sealed kmsuser password (within the store's
failed-login budget: a store whose budget is spent is as Unavailable as a FAILED one), and a
`BackendError` is translated once into the KMS error the operation's model lists
(`hsm_errors.to_kms_error`).
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from hsmbridge.backend import BackendError, HsmBackend, LoginError
from hsmbridge.errors import KeyUnavailableException, KmsError, KMSInvalidStateException
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionState, KeyRecord
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm_errors import to_kms_error
from hsmbridge.service.login_budget import LoginBudgetSpentError

log = logging.getLogger(__name__)

# An HSM that keeps failing must not turn every request into a log line: one line per kind of
# failure at most this often, counting the ones left out.
FAULT_LOG_INTERVAL_S = 1.0


class _FaultLog:
    """The HSM failures answered with a retryable fault (5xx): logged, since the client's answer
    says only "retry", but throttled per kind of backend error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, left out since)

    def report(self, exc: BackendError, answer: KmsError) -> None:
        if isinstance(exc, LoginError):
            return  # the login's own warning (service.connections) said it already
        kind = type(exc).__name__
        now = time.monotonic()
        with self._lock:
            logged_at, left_out = self._last.get(kind, (float("-inf"), 0))
            if now - logged_at < FAULT_LOG_INTERVAL_S:
                self._last[kind] = (logged_at, left_out + 1)
                return
            self._last[kind] = (now, 0)
        more = f" ({left_out} more since the last such line)" if left_out else ""
        # Backend messages name the failure and the CKR code, never a PIN or key material.
        log.warning("HSM call failed, answered %s: %s: %s%s", answer.code, kind, exc, more)


_FAULTS = _FaultLog()


class _Translated:
    """A plain context manager, not @contextmanager: it sits on every cryptographic call."""

    __slots__ = ("_arn", "_retryable")

    def __init__(self, arn: str, retryable: type[KmsError]) -> None:
        self._arn = arn
        self._retryable = retryable

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, BackendError):
            answer = to_kms_error(exc, self._arn, retryable=self._retryable)
            if answer.fault:
                _FAULTS.report(exc, answer)
            raise answer from exc


class HsmGateway:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def translated(
        self, arn: str = "the key", *, retryable: type[KmsError] = KeyUnavailableException
    ) -> _Translated:
        """Backend calls made inside raise the KMS error their failure stands for. `retryable`
        is the fault the operation's model lists for "try again" (see `to_kms_error`)."""
        return _Translated(arn, retryable)

    def login(
        self, row: StoredKeyStore, *, retryable: type[KmsError] = KeyUnavailableException
    ) -> HsmBackend:
        """The store's live HSM login, made on first use in this process."""
        with self.translated(retryable=retryable):
            return self._live(row)

    def _live(self, row: StoredKeyStore) -> HsmBackend:
        store = row.store
        return self._ctx.connections.get(
            store.store_id, store.cluster_id, lambda: self._ctx.password_of(row)
        )

    def for_key(self, record: KeyRecord, row: StoredKeyStore | None = None) -> HsmBackend:
        """The login for a key's store (`row`, if the caller already read it); the store must be
        CONNECTED, else the key is Unavailable and a login this process still holds is closed."""
        row = row or self._ctx.store_row(record.custom_key_store_id)
        if row.store.connection_state is not ConnectionState.CONNECTED:
            self._ctx.connections.detach(row.store.store_id)
            raise KMSInvalidStateException(f"{record.arn} is unavailable.")
        with self.translated():
            try:
                return self._live(row)
            except LoginBudgetSpentError as exc:
                # Another process spent the budget after we read CONNECTED: the store is FAILED.
                raise KMSInvalidStateException(f"{record.arn} is unavailable.") from exc
