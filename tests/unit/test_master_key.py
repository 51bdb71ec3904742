"""Where the master key comes from (`hsmbridge.keystore.master_key`): the environment, a
command (a secrets manager's CLI), or the 0600 file; and a service that never writes the key
into its data directory when it comes from elsewhere."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

from hsmbridge.errors import ConfigError
from hsmbridge.keystore.master_key import ENV_VAR, load_master_key
from hsmbridge.keystore.passwords import PasswordVault
from tests.callers import ADMIN
from tests.service.steps import new_key

KEY = bytes(range(32))
B64 = base64.b64encode(KEY).decode()


def _printer(tmp_path: Path, out: str, status: int = 0, err: str = "") -> list[str]:
    script = tmp_path / "print-key.py"
    script.write_text(
        f"import sys\nsys.stdout.write({out!r})\nsys.stderr.write({err!r})\nsys.exit({status})\n"
    )
    return [sys.executable, str(script)]


def test_precedence_environment_then_command_then_file(tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    other = base64.b64encode(bytes(32)).decode()
    command = _printer(tmp_path, other + "\n")
    from_env = load_master_key(key_file, command, {ENV_VAR: B64})
    assert (from_env.key, from_env.source) == (KEY, f"the environment variable {ENV_VAR}")
    from_command = load_master_key(key_file, command, {})
    assert from_command.key == bytes(32)
    assert "master_key_command" in from_command.source
    assert not key_file.exists()  # neither wrote the key into the data directory
    from_file = load_master_key(key_file, (), {})
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_master_key(key_file, (), {}).key == from_file.key
    assert KEY.hex() not in repr(from_env)


@pytest.mark.parametrize(
    ("out", "status", "err", "words"),
    [
        ("not base64!\n", 0, "", ["is not base64"]),
        (base64.b64encode(bytes(16)).decode(), 0, "", ["holds 16 bytes", "is 32"]),
        (B64, 3, "AccessDenied: no such secret\n", ["exit status 3", "AccessDenied"]),
    ],
)
def test_a_bad_answer_is_a_configuration_error_that_shows_no_key(tmp_path, out, status, err, words):
    with pytest.raises(ConfigError) as caught:
        load_master_key(tmp_path / "master.key", _printer(tmp_path, out, status, err), {})
    for word in words:
        assert word in str(caught.value)
    assert B64 not in str(caught.value)


def test_a_missing_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_master_key(tmp_path / "master.key", [str(tmp_path / "no-such-cli")], {})


def test_a_service_keyed_by_a_command_keeps_no_key_file(make_fake_env, tmp_path) -> None:
    env = make_fake_env(store=False)
    env.close()
    env.settings.master_key_file.unlink()  # the first open made one; it sealed nothing yet
    with env.config_path.open("a") as fh:
        argv = ", ".join(f'"{arg}"' for arg in _printer(tmp_path, B64))
        fh.write(f"\n[secrets]\nmaster_key_command = [{argv}]\n")
    svc = env.open()
    store = svc.keystores.create(ADMIN, "Keyed", env.cluster_id, env.pki.ca_cert_pem, env.password)
    svc.keystores.connect(ADMIN, store)
    env.store_id = store
    row = svc.ctx.store_row(store)
    assert PasswordVault("test", key=KEY).unseal(row.password_blob, store) == env.password
    env.restart()  # the same command gives the same key: the sealed password opens again
    new_key(env)
    assert not env.settings.master_key_file.exists()
    assert not any(p.name == "master.key" for p in env.root.rglob("*"))
