"""Secrets at rest: the kmsuser password sealed with AES-GCM under a 0600 key file, the metadata
database and audit log 0600, and start-up (create_app and the CLI) refusing group- or
world-accessible secret files with a ConfigError naming the file and the chmod to run."""

from __future__ import annotations

import stat

import pytest

from hsmbridge.bootstrap import check_secret_files
from hsmbridge.errors import ConfigError
from hsmbridge.http.compose import create_app
from hsmbridge.keystore.passwords import PasswordVault
from hsmbridge.main import main as cli_main

pytestmark = pytest.mark.softhsm


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_service_files_are_private_and_the_password_is_sealed(live):
    settings = live.env.settings
    for path in (settings.master_key_file, settings.metadata_db, settings.audit_log):
        assert _mode(path) == 0o600, path
    for suffix in ("-wal", "-shm"):
        sidecar = settings.metadata_db.with_name(settings.metadata_db.name + suffix)
        if sidecar.exists():
            assert _mode(sidecar) == 0o600, sidecar
    row = live.runtime.service.ctx.meta.get_key_store(live.store_id)
    # The password the store was given, or the one the rotation at connect set in its place.
    password = PasswordVault(settings.master_key_file).unseal(row.password_blob, live.store_id)
    assert password in (live.env.password, live.runtime.service.ctx.password_of(row))
    for secret in (password, live.env.password):
        assert secret.encode() not in row.password_blob
    assert row.password_blob[0] == 1  # versioned AES-GCM blob (passwords.py layout)


@pytest.fixture
def stopped_env(make_kms_env):
    """An environment whose DB, master key and credentials exist, with no service running."""
    env = make_kms_env()
    env.close()
    (env.settings.data_dir / "kmsuser.password").write_text(env.password)
    (env.settings.data_dir / "kmsuser.password").chmod(0o600)
    check_secret_files(env.settings)  # baseline: everything private
    return env


SECRET_FILES = {
    "master key file": lambda s: s.master_key_file,
    "credentials file": lambda s: s.credentials_file,
    "metadata database": lambda s: s.metadata_db,
    "secret file kmsuser.password": lambda s: s.data_dir / "kmsuser.password",
}


@pytest.mark.parametrize("what", sorted(SECRET_FILES))
@pytest.mark.parametrize(("mode", "word"), [(0o644, "world-readable"), (0o640, "group-accessible")])
def test_create_app_refuses_exposed_secret_files(stopped_env, what, mode, word):
    settings = stopped_env.settings
    path = SECRET_FILES[what](settings)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        create_app(settings, sweep_interval_s=None)
    message = str(info.value)
    assert message.startswith(f"{what} {path} is {word} (mode {mode:04o})")
    assert f"run `chmod 600 {path}`" in message
    assert _mode(path) == mode  # refused, not silently fixed (the DB store would chmod it)


def test_cli_refuses_exposed_metadata_database(stopped_env, capsys):
    settings = stopped_env.settings
    settings.metadata_db.chmod(0o604)
    code = cli_main(["keystore", "describe", "--config", str(stopped_env.config_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"metadata database {settings.metadata_db} is world-readable" in err
    assert f"chmod 600 {settings.metadata_db}" in err


def test_missing_files_are_fine_on_first_start(tmp_path, stopped_env):
    settings = stopped_env.settings
    settings.master_key_file.unlink()
    check_secret_files(settings)  # created 0600 later by the vault
