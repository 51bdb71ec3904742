"""kmsuser's password rotation when a custom key store connects, as KMS does it.

Owns: `rotate_password(ctx, store_id)`. KMS logs in as kmsuser at every connect and changes its
password to a value only KMS knows, so that nobody else can log in as kmsuser while the store is
connected; the password an operator gave with Create/UpdateCustomKeyStore is good for one
connect. hsmbridge does the same where the cluster's profile rotates (`password_rotation`),
through the HSM connector's `change_password` (CloudHSM: its `cloudhsm-cli`).

Crash safety: the new password is sealed into the store's record as *pending* before the HSM is
asked to change it, and becomes the current one only after the HSM said yes. Whatever instant a
process dies at, the password the HSM holds is among the record's candidates (current first),
and the next connect tries them in turn: a crash costs at most one failed login per candidate,
and the pending list is capped so that the candidates always fit in the failed-login budget.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import logging
import secrets
import string
import time
from typing import Final

from hsmbridge.backend import LoginError
from hsmbridge.config import PasswordRotation
from hsmbridge.keystore.passwords import PasswordRecord
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionErrorCode
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.login_watch import WATCH_INTERVAL_S

log = logging.getLogger(__name__)

# CloudHSM passwords: 7-32 alphanumeric characters; the longest, drawn from all of them.
NEW_PASSWORD_LENGTH: Final = 32
_ALPHABET: Final = string.ascii_letters + string.digits
# Candidates tried at a connect: the current password and at most this many pending ones (the
# budget allows 4 failed logins on CloudHSM, which locks at 5).
MAX_PENDING: Final = 2
# kmsuser logged in elsewhere may be this server's own other processes, whose logins of a store
# that was just disconnected close within their login watch's interval; a login that outlasts
# that is somebody else's, and the connect fails with USER_LOGGED_IN.
LOGGED_IN_GRACE_S = 2 * WATCH_INTERVAL_S + 1.0
LOGGED_IN_RETRY_S = 0.25


def rotates(ctx: ServiceContext, cluster_id: str) -> bool:
    binding = ctx.settings.binding(cluster_id)
    return binding is not None and binding.profile.password_rotation is not PasswordRotation.NONE


def rotate_password(ctx: ServiceContext, store_id: str) -> str:
    """Change kmsuser's password to a new random one and return it; the store must be
    CONNECTING. Raises LoginError (with the reason KMS reports) or BackendError, after which
    the record holds every password the HSM may hold."""
    row = ctx.store_row(store_id)
    cluster_id = row.store.cluster_id
    record = ctx.password_record(row)
    new = "".join(secrets.choice(_ALPHABET) for _ in range(NEW_PASSWORD_LENGTH))
    candidates = record.candidates()
    _keep(ctx, store_id, PasswordRecord(record.current, (*record.pending, new)[-MAX_PENDING:]))
    for i, old in enumerate(candidates):
        try:
            _change(ctx, store_id, cluster_id, old, new)
        except LoginError as exc:
            if exc.reason is ConnectionErrorCode.INVALID_CREDENTIALS and i + 1 < len(candidates):
                continue  # an earlier rotation may have changed it: the next candidate
            # The tool could not log in (or was refused): nothing changed in the cluster.
            _keep(ctx, store_id, record)
            raise
        # From here on only `new` logs in: it is the one password the record keeps.
        _keep(ctx, store_id, PasswordRecord(new))
        log.info("custom key store %s: kmsuser's password rotated", store_id)
        return new
    raise AssertionError("unreachable: the last candidate either succeeds or raises")


def _change(ctx: ServiceContext, store_id: str, cluster_id: str, old: str, new: str) -> None:
    """One password change; kmsuser logged in elsewhere is waited for a little while."""
    give_up = time.monotonic() + LOGGED_IN_GRACE_S
    while True:
        try:
            ctx.connections.change_password(store_id, cluster_id, old, new)
            return
        except LoginError as exc:
            if exc.reason is not ConnectionErrorCode.USER_LOGGED_IN or time.monotonic() > give_up:
                raise
        time.sleep(LOGGED_IN_RETRY_S)


def _keep(ctx: ServiceContext, store_id: str, record: PasswordRecord) -> None:
    with ctx.meta.write():
        row = ctx.store_row(store_id)
        blob = ctx.vault.seal_record(record, store_id)
        ctx.meta.put_key_store(StoredKeyStore(row.store, blob))
