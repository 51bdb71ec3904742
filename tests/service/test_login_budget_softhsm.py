"""Failed kmsuser logins on a real SoftHSM2 token (hardening finding F8): the PKCS#11 library's
own refusal (CKR_PIN_INCORRECT) drives the backoff and the failed-login budget.

SoftHSM2 never locks a user, so the test counts the refused logins itself, at the connector;
the softhsm2 profile mirrors CloudHSM's lockout at 5, so hsmbridge must stop after 4. The rules
in detail, on a fake HSM: test_login_budget.py; against the CloudHSM stand-in's own count of
failed logins: tests/cloudhsm/test_cloudhsm_profile.py.
"""

from __future__ import annotations

import itertools

import pytest

from hsmbridge.backend import HsmConnector, LoginError
from hsmbridge.bootstrap.connector import default_connector
from hsmbridge.config import load_profile
from hsmbridge.errors import KeyUnavailableException, KmsError, KMSInvalidStateException
from hsmbridge.model import ConnectionErrorCode, ConnectionState
from tests.callers import ADMIN
from tests.cloudhsm_shim import softhsm2_only
from tests.conftest import SO_PIN, SOFTHSM_MODULE
from tests.harness import SOFTHSM2_PROFILE, FakeClock
from tests.service.steps import new_key, store_state

pytestmark = [pytest.mark.softhsm, softhsm2_only]
C = ConnectionState
THRESHOLD = load_profile(SOFTHSM2_PROFILE).login_lockout_threshold
NEW_PIN = "officer-set-pin7"


class _CountingConnector:
    """The real PKCS#11 connector, counting the logins the token refused."""

    def __init__(self, inner: HsmConnector) -> None:
        self.inner = inner
        self.refused = 0

    def connect(self, cluster_id: str, password: str):
        try:
            return self.inner.connect(cluster_id, password)
        except LoginError:
            self.refused += 1
            raise


def _officer_sets_user_pin(token_label: str, pin: str) -> None:
    """C_InitPIN as the security officer, in this process: a change made by pkcs11-tool in
    another process went unseen by this process's loaded SoftHSM2 (2.6.1)."""
    import pkcs11

    token = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=token_label)
    with token.open(rw=True, so_pin=SO_PIN) as session:
        session.init_pin(pin)


def test_pin_changed_on_the_token_stops_one_short_of_the_lockout_then_the_runbook_restores(
    kms_env,
) -> None:
    key = new_key(kms_env)
    blob = kms_env.svc.crypto.encrypt(ADMIN, key, b"before").ciphertext_blob
    # The service process ends (its login with it); an officer changes kmsuser's PIN meanwhile;
    # a new process finds the store CONNECTED in the metadata and logs in on first use.
    kms_env.close()
    _officer_sets_user_pin(kms_env.token_label, NEW_PIN)
    counting = _CountingConnector(default_connector(kms_env.settings))
    kms_env.connector = lambda settings: counting
    kms_env.login_clock = clock = FakeClock(0.0)
    svc = kms_env.open()
    assert store_state(kms_env) == (C.CONNECTED, None)

    answers: list[tuple[type[KmsError], int]] = []  # (error, logins refused so far)
    for _ in range(THRESHOLD * 4):
        with pytest.raises(KmsError) as caught:
            svc.crypto.decrypt(ADMIN, blob)
        answers.append((type(caught.value), counting.refused))
        assert counting.refused <= THRESHOLD - 1
        clock.advance(3)  # some requests fall inside a backoff (1, 2, 4 ... s), some after
    assert counting.refused == THRESHOLD - 1
    assert store_state(kms_env) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)
    assert answers[0] == (KeyUnavailableException, 1)
    backed_off = [a for a, b in itertools.pairwise(answers) if a == b]
    assert (KeyUnavailableException, 3) in backed_off  # answered without asking the token
    assert answers[-1] == (KMSInvalidStateException, THRESHOLD - 1)

    ks, sid = svc.keystores, kms_env.store_id
    ks.disconnect(ADMIN, sid)
    ks.update(ADMIN, sid, password=NEW_PIN)
    ks.connect(ADMIN, sid)
    assert store_state(kms_env) == (C.CONNECTED, None)
    assert svc.crypto.decrypt(ADMIN, blob).plaintext == b"before"
    assert counting.refused == THRESHOLD - 1
    assert svc.ctx.meta.failed_logins(sid) == 0
