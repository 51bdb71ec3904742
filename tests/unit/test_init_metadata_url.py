"""`hsmbridge init --metadata-url URL` writes a configuration whose metadata lives there; a URL
with a password makes hsmbridge.toml private, and a bad URL is refused before anything is written.
(The full `init` run, with its SoftHSM2 token, is tested in tests/cli.)"""

from __future__ import annotations

import stat

import pytest

from hsmbridge.cli import init_cmd
from hsmbridge.config import load_settings
from hsmbridge.errors import ConfigError

CLUSTER = "cluster-abcdefghijk"


def _write(tmp_path, url):
    return init_cmd._config(tmp_path, CLUSTER, "us-east-1", "111122223333", 4599, metadata=url)


def test_a_postgresql_url_is_written_and_a_password_makes_the_file_private(tmp_path):
    url = 'postgresql://kms:pa"ss@db.internal:5432/kms?sslmode=require'
    path = _write(tmp_path, url)
    settings = load_settings(path, environ={})
    assert (settings.metadata_url, settings.metadata_db) == (url, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_without_a_url_the_sqlite_default_stays(tmp_path):
    path = _write(tmp_path, None)
    assert "[metadata]" not in path.read_text()
    assert load_settings(path, environ={}).metadata_db == tmp_path / "metadata.sqlite3"
    assert not stat.S_IMODE(path.stat().st_mode) & 0o022


def test_a_bad_url_is_refused_without_showing_its_password(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _write(tmp_path, "postgresql://kms:hunter2@db.internal")
    assert "--metadata-url" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert not (tmp_path / "hsmbridge.toml").exists()
