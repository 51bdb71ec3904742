"""The `cloudhsm` profile against the CloudHSM stand-in, in this process, through the service.

What the profile claims about CloudHSM, checked against a module that behaves as CloudHSM's is
documented to: the "kmsuser:password" login, the HSM-written GCM IV, the tag failure as
InvalidCiphertextException, the key template accepted and read back exactly, and, against the
stand-in's own count of failed logins shared by every process, that hsmbridge stops one failed
login short of the lockout and maps a locked or missing kmsuser to USER_LOCKED_OUT and
USER_NOT_FOUND.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmbridge.config import builtin_profile, load_profile
from hsmbridge.errors import InvalidCiphertextException
from hsmbridge.model import ConnectionErrorCode, ConnectionState
from tests.callers import ADMIN
from tests.harness import KmsEnv
from tests.service.steps import new_key, store_state

pytestmark = pytest.mark.softhsm
C = ConnectionState
THRESHOLD = load_profile(builtin_profile("cloudhsm")).login_lockout_threshold


def _failed_logins(state: Path, env: KmsEnv) -> int:
    counter = state / env.token_label / "failed-logins" / "kmsuser"
    return int(counter.read_text()) if counter.exists() else 0


def test_keys_and_ciphertexts_through_the_cloudhsm_profile(make_cloudhsm_env) -> None:
    env = make_cloudhsm_env()
    assert store_state(env) == (C.CONNECTED, None)
    key = new_key(env)
    context = {"purpose": "test"}
    first = env.svc.crypto.encrypt(ADMIN, key, b"secret", context=context)
    second = env.svc.crypto.encrypt(ADMIN, key, b"secret", context=context)
    assert first.ciphertext_blob != second.ciphertext_blob  # a fresh HSM-written IV each time
    answer = env.svc.crypto.decrypt(ADMIN, first.ciphertext_blob, context=context)
    assert answer.plaintext == b"secret"
    blob = bytearray(first.ciphertext_blob)
    blob[-1] ^= 1
    with pytest.raises(InvalidCiphertextException):
        env.svc.crypto.decrypt(ADMIN, bytes(blob), context=context)
    backend = env.svc.ctx.connections.peek(env.store_id)
    (info,) = backend.find_keys(f"arn:aws:kms:us-east-1:111122223333:key/{key}")
    assert info.value_len == 32
    assert info.never_extractable
    assert info.local


def test_bad_password_stops_one_short_of_the_stand_ins_lockout(make_cloudhsm_env, shim_state):
    env = make_cloudhsm_env(store=False)
    svc = env.svc
    store = svc.keystores.create(
        ADMIN, "WrongPassword", env.cluster_id, env.pki.ca_cert_pem, "not-the-password"
    )
    for _ in range(THRESHOLD * 2):
        svc.keystores.connect(ADMIN, store)  # fails: the store goes FAILED, nothing raised
        assert store_state(env, store) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)
        svc.keystores.disconnect(ADMIN, store)
    # The stand-in counted exactly what hsmbridge tried: one short of locking kmsuser.
    assert _failed_logins(shim_state, env) == THRESHOLD - 1
    svc.keystores.connect(ADMIN, store)
    assert store_state(env, store) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)
    assert _failed_logins(shim_state, env) == THRESHOLD - 1  # no attempt made
    # The runbook: disconnect, give the right password, connect; the count starts again.
    svc.keystores.disconnect(ADMIN, store)
    svc.keystores.update(ADMIN, store, password=env.password)
    svc.keystores.connect(ADMIN, store)
    assert store_state(env, store) == (C.CONNECTED, None)
    assert _failed_logins(shim_state, env) == 0


@pytest.mark.parametrize(
    ("prepare", "code"),
    [
        ("locked", ConnectionErrorCode.USER_LOCKED_OUT),
        ("no kmsuser", ConnectionErrorCode.USER_NOT_FOUND),
    ],
)
def test_a_locked_or_missing_kmsuser_is_reported_as_kms_does(
    make_cloudhsm_env, shim_state, prepare, code
) -> None:
    env = make_cloudhsm_env(store=False)
    cluster = shim_state / env.token_label
    if prepare == "locked":
        (cluster / "failed-logins").mkdir(parents=True, exist_ok=True)
        (cluster / "failed-logins" / "kmsuser").write_text(f"{THRESHOLD}\n")
    else:
        cluster.mkdir(parents=True, exist_ok=True)
        (cluster / "users").write_text("appuser\n")
    store = env.svc.keystores.create(
        ADMIN, "Refused", env.cluster_id, env.pki.ca_cert_pem, env.password
    )
    env.svc.keystores.connect(ADMIN, store)
    assert store_state(env, store) == (C.FAILED, code)
