"""Custom key store lifecycle on a real SoftHSM2 token: what the fake HSM cannot show.

Connect failures the PKCS#11 library itself produces (a wrong kmsuser password, a module that
cannot be loaded), Disconnect and what it does to keys checked against the token (through our
backend and pkcs11-tool), and the kmsuser password never leaking into logs, the DB file, output
or reprs on its way through the real backend. The service's own rules are in test_keystores.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hsmbridge.errors import (
    CustomKeyStoreInvalidStateException,
    DisabledException,
    KMSInvalidStateException,
)
from hsmbridge.model import ConnectionErrorCode, ConnectionState, KeyState
from hsmbridge.protocol import codec
from tests.callers import ADMIN
from tests.cloudhsm_shim import runbook_password
from tests.conftest import SO_PIN
from tests.service.checks import assert_consistent
from tests.service.steps import new_key, store_state

pytestmark = pytest.mark.softhsm
C = ConnectionState


# --- ConnectCustomKeyStore --------------------------------------------------------------------


def test_wrong_password_fails_with_invalid_credentials_until_fixed(kms_env) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    assert store_state(kms_env) == (C.CONNECTED, None)
    ks.disconnect(ADMIN, sid)
    ks.update(ADMIN, sid, password="wrongpass1")
    ks.connect(ADMIN, sid)
    assert store_state(kms_env) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)
    wire = codec.custom_key_store(ks.describe(ADMIN, sid).items[0])
    assert wire["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    # A FAILED store must be disconnected before it is connected again.
    with pytest.raises(CustomKeyStoreInvalidStateException, match="disconnected"):
        ks.connect(ADMIN, sid)
    ks.disconnect(ADMIN, sid)
    assert store_state(kms_env) == (C.DISCONNECTED, None)  # the error code goes with FAILED
    known = runbook_password(kms_env.token_label, SO_PIN, kms_env.password)
    ks.update(ADMIN, sid, password=known)
    ks.connect(ADMIN, sid)
    assert store_state(kms_env) == (C.CONNECTED, None)
    new_key(kms_env)


def test_unreachable_pkcs11_module_is_network_errors(kms_env, tmp_path: Path) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    ks.disconnect(ADMIN, sid)
    kms_env.move_module(tmp_path / "no-such-pkcs11.so")
    kms_env.restart()
    kms_env.svc.keystores.connect(ADMIN, sid)
    assert store_state(kms_env) == (C.FAILED, ConnectionErrorCode.NETWORK_ERRORS)


# --- DisconnectCustomKeyStore and key states --------------------------------------------------


def test_disconnect_makes_keys_unavailable_and_management_still_works(kms_env) -> None:
    svc, sid = kms_env.svc, kms_env.store_id
    k_enabled, k_disabled, k_pending = (new_key(kms_env) for _ in range(3))
    svc.keys.disable(ADMIN, k_disabled)
    svc.keys.schedule_deletion(ADMIN, k_pending, 7)
    blob = svc.crypto.encrypt(ADMIN, k_enabled, b"secret").ciphertext_blob
    svc.keystores.disconnect(ADMIN, sid)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keystores.disconnect(ADMIN, sid)
    states = {k: svc.keys.describe(ADMIN, k).key_state for k in (k_enabled, k_disabled, k_pending)}
    assert states == {
        k_enabled: KeyState.UNAVAILABLE,
        k_disabled: KeyState.UNAVAILABLE,
        k_pending: KeyState.PENDING_DELETION,  # stays, so deletion can still be cancelled
    }
    assert not any(svc.keys.describe(ADMIN, k).enabled for k in states)
    with pytest.raises(KMSInvalidStateException, match="unavailable"):
        svc.crypto.encrypt(ADMIN, k_enabled, b"more")
    with pytest.raises(KMSInvalidStateException, match="unavailable"):
        svc.crypto.decrypt(ADMIN, blob)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.crypto.generate_random(ADMIN, 16, sid)
    # Enable/Disable are accepted while Unavailable and take effect at reconnect, as in KMS.
    svc.keys.disable(ADMIN, k_enabled)
    svc.keys.enable(ADMIN, k_disabled)
    assert svc.keys.describe(ADMIN, k_enabled).key_state is KeyState.UNAVAILABLE
    with pytest.raises(KMSInvalidStateException, match="pending deletion"):
        svc.keys.enable(ADMIN, k_pending)
    svc.keystores.connect(ADMIN, sid)
    after = {k: svc.keys.describe(ADMIN, k).key_state for k in states}
    assert after == {
        k_enabled: KeyState.DISABLED,
        k_disabled: KeyState.ENABLED,
        k_pending: KeyState.PENDING_DELETION,
    }
    with pytest.raises(DisabledException):
        svc.crypto.decrypt(ADMIN, blob)
    assert svc.crypto.decrypt(
        ADMIN, svc.crypto.encrypt(ADMIN, k_disabled, b"hi").ciphertext_blob
    ).plaintext == (b"hi")
    assert_consistent(kms_env)


# --- the kmsuser password never leaks ---------------------------------------------------------


def test_password_never_logged_stored_in_clear_returned_or_in_reprs(
    make_kms_env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = make_kms_env()
    svc, sid, secrets = env.svc, env.store_id, (env.password, "wrongpass1")
    key = new_key(env)
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password="wrongpass1")
    svc.keystores.connect(ADMIN, sid)  # FAILED: INVALID_CREDENTIALS, logged as a warning
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password=env.password)
    svc.keystores.connect(ADMIN, sid)
    # The failed login was logged, so the records below include the path that handles it.
    assert any("login as kmsuser failed" in r.getMessage() for r in caplog.records)
    shown = [
        "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records),
        json.dumps(codec.custom_key_store(svc.keystores.describe(ADMIN, sid).items[0])),
        json.dumps(codec.key_metadata(svc.keys.describe(ADMIN, key))),
        repr(svc.ctx),
        repr(svc.ctx.meta.get_key_store(sid)),
        repr(svc.keystores),
        repr(svc.ctx.connections.peek(sid)),
        "\n".join(e.to_json() for e in env.audit.events),
    ]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    svc.ctx.meta.close()  # checkpoint the WAL so the main file holds everything
    for path in env.settings.data_dir.iterdir():
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, path
