"""The `cloudhsm` profile against the CloudHSM stand-in, in this process, through the service.

What the profile claims about CloudHSM, checked against a module that behaves as CloudHSM's is
documented to: the "kmsuser:password" login, the HSM-written GCM IV, the tag failure as
InvalidCiphertextException, the key template accepted and read back exactly, and, against the
stand-in's own count of failed logins shared by every process, that hsmbridge stops one failed
login short of the lockout and maps a locked or missing kmsuser to USER_LOCKED_OUT and
USER_NOT_FOUND.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsmbridge.config import builtin_profile, load_profile
from hsmbridge.errors import InvalidCiphertextException
from hsmbridge.keystore.passwords import PasswordRecord
from hsmbridge.model import ConnectionErrorCode, ConnectionState
from hsmbridge.service import rotation
from tests.callers import ADMIN
from tests.cloudhsm_shim import officer_resets_kmsuser
from tests.conftest import SO_PIN
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


# --- kmsuser's password rotation at connect ------------------------------------------------------

KNOWN = "OfficerSet2024pw"


_LOGIN = """
import sys, pkcs11
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
try:
    session = token.open(user_pin="kmsuser:" + sys.argv[3])
except pkcs11.PKCS11Error as exc:
    print(type(exc).__name__, flush=True)
    sys.exit(0)
print("ok", flush=True)
if len(sys.argv) > 4:  # hold the login until standard input closes
    sys.stdin.read()
session.close()
"""


def _login_elsewhere(env: KmsEnv, password: str, *, hold: bool = False) -> Any:
    module = env.settings.clusters[env.cluster_id].profile.module_path
    argv = [sys.executable, "-c", _LOGIN, module, env.token_label, password]
    if not hold:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        return done.stdout.strip()
    child = subprocess.Popen([*argv, "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ok"
    return child


def _record(env: KmsEnv) -> PasswordRecord:
    return env.svc.ctx.password_record(env.svc.ctx.store_row(env.store_id))


def test_each_connect_rotates_kmsuser_to_a_password_only_hsmbridge_knows(make_cloudhsm_env):
    env = make_cloudhsm_env()
    key = new_key(env)
    first = _record(env)
    assert first.current != env.password
    assert first.pending == ()
    assert _login_elsewhere(env, env.password) == "PinIncorrect"  # the given one is spent
    assert _login_elsewhere(env, first.current) == "ok"
    env.svc.keystores.disconnect(ADMIN, env.store_id)
    env.svc.keystores.connect(ADMIN, env.store_id)
    assert store_state(env) == (C.CONNECTED, None)
    second = _record(env)
    assert second.current not in (first.current, env.password)
    assert _login_elsewhere(env, first.current) == "PinIncorrect"
    blob = env.svc.crypto.encrypt(ADMIN, key, b"still mine").ciphertext_blob
    assert env.svc.crypto.decrypt(ADMIN, blob).plaintext == b"still mine"


def test_the_documented_recovery_runbook(make_cloudhsm_env):
    """Disconnect, an officer sets a known password, UpdateCustomKeyStore, connect."""
    env = make_cloudhsm_env()
    svc, store = env.svc, env.store_id
    svc.keystores.disconnect(ADMIN, store)
    officer_resets_kmsuser(env.token_label, SO_PIN, KNOWN)
    assert _login_elsewhere(env, KNOWN) == "ok"  # the operator's audit as kmsuser, logged out
    svc.keystores.update(ADMIN, store, password=KNOWN)
    svc.keystores.connect(ADMIN, store)
    assert store_state(env) == (C.CONNECTED, None)
    assert _login_elsewhere(env, KNOWN) == "PinIncorrect"  # rotated again


def test_kmsuser_logged_in_elsewhere_is_user_logged_in_until_it_logs_out(
    make_cloudhsm_env, monkeypatch
):
    monkeypatch.setattr(rotation, "LOGGED_IN_GRACE_S", 0.5)  # a server's own logins: 5 s
    env = make_cloudhsm_env()
    svc, store = env.svc, env.store_id
    svc.keystores.disconnect(ADMIN, store)
    officer_resets_kmsuser(env.token_label, SO_PIN, KNOWN)
    svc.keystores.update(ADMIN, store, password=KNOWN)
    child = _login_elsewhere(env, KNOWN, hold=True)
    try:
        svc.keystores.connect(ADMIN, store)
        assert store_state(env) == (C.FAILED, ConnectionErrorCode.USER_LOGGED_IN)
        assert _record(env).current == KNOWN  # nothing changed in the cluster
    finally:
        child.communicate(timeout=30)  # logs out and exits
    svc.keystores.disconnect(ADMIN, store)
    svc.keystores.connect(ADMIN, store)
    assert store_state(env) == (C.CONNECTED, None)


class _CrashError(Exception):
    pass


def test_a_crash_between_the_change_and_its_record_costs_one_failed_login(
    make_cloudhsm_env, shim_state, monkeypatch
):
    env = make_cloudhsm_env()
    svc, store = env.svc, env.store_id
    svc.keystores.disconnect(ADMIN, store)
    before = _record(env).current
    real_keep = rotation._keep

    def crash_on_promotion(ctx, store_id, record):
        if not record.pending and record.current != before:
            raise _CrashError("the process died after the HSM changed the password")
        real_keep(ctx, store_id, record)

    monkeypatch.setattr(rotation, "_keep", crash_on_promotion)
    svc.keystores.connect(ADMIN, store)  # dies in the rotation: the connect ends FAILED
    assert store_state(env)[0] is C.FAILED
    stuck = _record(env)
    assert stuck.current == before
    assert len(stuck.pending) == 1  # what the HSM holds now
    assert _login_elsewhere(env, stuck.pending[0]) == "ok"
    monkeypatch.setattr(rotation, "_keep", real_keep)
    svc.keystores.disconnect(ADMIN, store)
    svc.keystores.connect(ADMIN, store)
    assert store_state(env) == (C.CONNECTED, None)
    assert _record(env).pending == ()
    assert _failed_logins(shim_state, env) == 0  # one failure (the stale current), then reset
