"""The CLI's exit codes 3 (HSM or cluster unreachable, or the kmsuser login refused) and 4
(internal error), each produced for real: a PKCS#11 module that is not there, a cloudhsmv2
endpoint nobody listens on, a token PIN changed behind hsmbridge's back, a replaced master key, a
metadata file that is not a SQLite database. A bug must never look like an unreachable HSM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsmbridge.main import main
from tests.cli.process import run_hsmbridge
from tests.cloudhsm_shim import officer_sets_password
from tests.conftest import SO_PIN
from tests.harness import ACCESS_KEY, SECRET_KEY, KmsEnv

pytestmark = pytest.mark.softhsm


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _create_key(env: KmsEnv) -> list[str]:
    assert env.store_id is not None
    return ["key", "create", "--config", str(env.config_path), "--origin", "AWS_CLOUDHSM",
            "--custom-key-store-id", env.store_id]  # fmt: skip


def _one_line(err: str, exception: str) -> None:
    assert err.startswith(f"{exception}: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_key_create_with_the_pkcs11_module_gone_exits_3(kms_env, capsys, tmp_path: Path) -> None:
    code, out, err = _run(capsys, *_create_key(kms_env))
    assert code == 0, err  # the same command works while the module is where the profile says
    assert json.loads(out)["KeyMetadata"]["KeyState"] == "Enabled"

    kms_env.move_module(tmp_path / "gone" / "libsofthsm2.so")

    code, out, err = _run(capsys, *_create_key(kms_env))
    assert (code, out) == (3, "")
    _one_line(err, "DependencyTimeoutException")  # CreateKey's retryable fault, as in its model
    assert "cannot communicate with your CloudHSM cluster" in err


def test_key_create_with_the_cluster_inventory_unreachable_exits_3(
    kms_env, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    config = kms_env.config_path.read_text()
    static = '[inventory]\nprovider = "static"\npath = "clusters.json"\n'
    assert static in config
    cloudhsm = (
        '[inventory]\nprovider = "cloudhsm"\nregion = "us-east-1"\n'
        'endpoint_url = "http://127.0.0.1:9"\n'  # the discard port: nothing listens there
    )
    kms_env.config_path.write_text(config.replace(static, cloudhsm))
    code, out, err = _run(capsys, *_create_key(kms_env))
    assert (code, out) == (3, "")
    _one_line(err, "DependencyTimeoutException")
    assert "cloudhsmv2 DescribeClusters" in err


@pytest.mark.slow  # two hsmbridge processes
def test_key_create_with_the_kmsuser_login_refused_exits_3(kms_env) -> None:
    # Another process (a fresh CLI) must log in: this one is logged in to the token already.
    first = run_hsmbridge(*_create_key(kms_env))
    assert first.code == 0, first.err
    new_pin = "changed-behind-our-back-1"
    officer_sets_password(kms_env.token_label, SO_PIN, new_pin)
    refused = run_hsmbridge(*_create_key(kms_env))
    assert (refused.code, refused.out) == (3, "")
    # One log line first: the failed login, with what is left before the HSM would lock kmsuser.
    warning, error = refused.err.splitlines(keepends=True)
    assert "WARNING" in warning
    assert "attempt(s) left" in warning
    _one_line(error, "DependencyTimeoutException")
    assert "cannot log in to your CloudHSM cluster as kmsuser" in refused.err
    assert new_pin not in refused.err
    assert kms_env.password not in refused.err


def test_kms_internal_exception_exits_4_not_3(kms_env, capsys) -> None:
    """A replaced master key cannot unseal the stored kmsuser password: KMSInternalException is a
    broken installation, not an unreachable HSM."""
    master = kms_env.settings.master_key_file
    master.write_bytes(bytes(range(32)))  # 32 bytes, 0600: well-formed, just not the key
    code, out, err = _run(capsys, *_create_key(kms_env))
    assert (code, out) == (4, "")
    _one_line(err, "KMSInternalException")
    assert "cannot be decrypted" in err


def test_unreadable_static_inventory_is_a_configuration_error_exit_2(kms_env, capsys) -> None:
    kms_env.inventory_path.unlink()
    code, out, err = _run(capsys, *_create_key(kms_env))
    assert (code, out) == (2, "")
    _one_line(err, "KMSInternalException")  # the KMS error a client would see, caused by config
    assert "clusters.json" in err


@pytest.mark.slow  # two hsmbridge processes
def test_unexpected_exception_exits_4_with_one_line_and_a_traceback_only_under_v(
    make_kms_env,
) -> None:
    env = make_kms_env(store=False)
    env.close()
    db = env.settings.metadata_db
    ok = run_hsmbridge("key", "list", "--config", env.config_path)
    assert ok.code == 0, ok.err  # the same command works on an intact database

    db.write_bytes(b"this is not a SQLite database, whatever its name says" * 100)
    db.chmod(0o600)
    for sidecar in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        sidecar.unlink(missing_ok=True)
    broken = run_hsmbridge("key", "list", "--config", env.config_path)
    assert (broken.code, broken.out) == (4, "")
    _one_line(broken.err, "KMSInternalException")
    assert "DatabaseError" in broken.err
    assert "-v" in broken.err

    verbose = run_hsmbridge("-v", "key", "list", "--config", env.config_path)
    assert (verbose.code, verbose.out) == (4, "")
    assert "Traceback (most recent call last)" in verbose.err
    assert "sqlite3.DatabaseError" in verbose.err
    assert verbose.err.rstrip("\n").splitlines()[-1] == broken.err.rstrip("\n")
