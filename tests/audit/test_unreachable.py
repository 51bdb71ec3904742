"""`hsmbridge audit` exits 3 when the HSM cannot be reached or refuses the kmsuser login.

Each case runs next to a control that differs only in the fault: the same command on the same
files exits 0 first. The token-directory cases run `python -m hsmbridge` in its own process:
SoftHSM reads SOFTHSM2_CONF and its token directory once per process, at C_Initialize.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.audit.conftest import create_keys
from tests.callers import ADMIN
from tests.cli.process import hsmbridge_env, run_hsmbridge
from tests.harness import KmsEnv

pytestmark = pytest.mark.softhsm


def _audit_argv(env: KmsEnv) -> list[str]:
    assert env.store_id is not None
    return ["audit", "--config", str(env.config_path), "--keystore", env.store_id]


def _private_copy_of_token(env: KmsEnv, where: Path) -> Path:
    """A softhsm2.conf whose token directory holds a copy of the env's token only."""
    shared = Path(os.environ["SOFTHSM2_CONF"]).read_text()
    [tokendir] = [
        line.split("=", 1)[1].strip()
        for line in shared.splitlines()
        if line.startswith("directories.tokendir")
    ]
    label = env.token_label.encode()
    [token] = [d for d in Path(tokendir).iterdir() if label in (d / "token.object").read_bytes()]
    tokens = where / "tokens"
    shutil.copytree(token, tokens / token.name)
    conf = where / "softhsm2.conf"
    conf.write_text(shared.replace(tokendir, str(tokens)))
    return conf


@pytest.mark.slow  # two hsmbridge processes
def test_token_directory_moved_away_exits_3(kms_env, tmp_path: Path) -> None:
    create_keys(kms_env, 2)
    conf = _private_copy_of_token(kms_env, tmp_path)
    env = hsmbridge_env(SOFTHSM2_CONF=str(conf))
    control = run_hsmbridge(*_audit_argv(kms_env), env=env)
    assert control.code == 0, control.err
    assert "2 HSM object(s) against 2 KMS key(s)" in control.err

    (tmp_path / "tokens").rename(tmp_path / "tokens.moved")
    moved = run_hsmbridge(*_audit_argv(kms_env), env=env)
    assert moved.code == 3, moved.err
    assert moved.out == ""
    assert "unreachable: HsmUnreachableError" in moved.err
    assert "Traceback" not in moved.err


@pytest.mark.slow  # two hsmbridge processes
def test_wrong_softhsm2_conf_exits_3(kms_env, tmp_path: Path) -> None:
    create_keys(kms_env, 1)
    control = run_hsmbridge(*_audit_argv(kms_env))
    assert control.code == 0, control.err
    wrong = hsmbridge_env(SOFTHSM2_CONF=str(tmp_path / "no-such-softhsm2.conf"))
    result = run_hsmbridge(*_audit_argv(kms_env), env=wrong)
    assert result.code == 3, result.err
    assert result.out == ""
    assert "unreachable: HsmUnreachableError" in result.err
    assert "Traceback" not in result.err


def test_pkcs11_module_path_invalid_exits_3(kms_env, audit, tmp_path: Path) -> None:
    create_keys(kms_env, 1)
    assert audit(kms_env).code == 0
    missing = tmp_path / "no-such-dir" / "libsofthsm2.so"
    kms_env.move_module(missing)
    result = audit(kms_env)
    assert result.code == 3, result.err
    assert result.out == ""
    assert "unreachable: HsmUnreachableError" in result.err
    assert str(missing) in result.err


def test_stored_password_refused_by_the_hsm_exits_3(kms_env, audit) -> None:
    """With --keystore the audit logs in with the store's stored kmsuser password; one the HSM
    refuses (set while the store was disconnected, as an operator might) is exit 3."""
    create_keys(kms_env, 1)
    svc, sid = kms_env.svc, kms_env.store_id
    svc.keystores.disconnect(ADMIN, sid)
    control = audit(kms_env)  # disconnected: the audit logs in for itself, and can
    assert control.code == 0, control.err
    wrong = "not-the-kmsuser-password-7"
    svc.keystores.update(ADMIN, sid, password=wrong)
    result = audit(kms_env)
    assert result.code == 3, result.err
    assert result.out == ""
    assert "unreachable: LoginError" in result.err
    assert wrong not in result.err
    assert kms_env.password not in result.err


def test_undecryptable_stored_password_is_an_internal_error_exit_4_not_3(kms_env, audit) -> None:
    """Not every failure to log in is "unreachable": a master key replaced under the metadata
    leaves a stored password nobody can decrypt, a broken installation (KMSInternalException)."""
    create_keys(kms_env, 1)
    kms_env.svc.keystores.disconnect(ADMIN, kms_env.store_id)
    kms_env.settings.master_key_file.write_bytes(bytes(32))  # well-formed, not the key
    result = audit(kms_env)
    assert result.code == 4, result.err
    assert result.out == ""
    assert result.err.splitlines()[-1].startswith("KMSInternalException: ")
    assert "cannot be decrypted" in result.err
