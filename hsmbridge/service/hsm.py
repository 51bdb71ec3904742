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

from types import TracebackType

from hsmbridge.backend import BackendError, HsmBackend
from hsmbridge.errors import KeyUnavailableException, KmsError, KMSInvalidStateException
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionState, KeyRecord
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm_errors import to_kms_error
from hsmbridge.service.login_budget import LoginBudgetSpentError


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
            raise to_kms_error(exc, self._arn, retryable=self._retryable) from exc


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
