"""The composition root: `bootstrap.open_service` builds the whole service from a `Settings`
alone (start-up checks, HSM environment, data directory, the configured metadata store). That no
layer but bootstrap names a metadata engine is an import-linter contract (pyproject.toml). Fake HSM
connector: nothing here reaches an HSM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsmbridge import bootstrap
from hsmbridge.config import load_settings
from hsmbridge.errors import ConfigError
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from tests.fakes import FakeConnector

CONFIG = (
    '[service]\nregion = "eu-west-2"\naccount_id = "111122223333"\n'
    '[paths]\ndata_dir = "data"\n'
    '[metadata]\nurl = "sqlite:///kms.sqlite3"\n'
    '[inventory]\nprovider = "static"\npath = "clusters.json"\n'
    '[hsm.env]\nHSMBRIDGE_TEST_BOOTSTRAP = "set"\n'
)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HSMBRIDGE_TEST_BOOTSTRAP", raising=False)
    path = tmp_path / "hsmbridge.toml"
    path.write_text(CONFIG)
    return path


def test_open_service_builds_everything_from_settings(config: Path) -> None:
    settings = load_settings(config)
    assert not settings.data_dir.exists()
    service = bootstrap.open_service(settings, connector=FakeConnector({}))
    try:
        assert os.environ["HSMBRIDGE_TEST_BOOTSTRAP"] == "set"
        meta = service.ctx.meta
        assert isinstance(meta, SqliteMetadataStore)
        assert meta.path == settings.data_dir / "kms.sqlite3"
        assert service.ctx.settings is settings
    finally:
        service.close()


def test_an_injected_metadata_store_is_used_and_not_opened_again(config: Path) -> None:
    settings = load_settings(config)
    settings.data_dir.mkdir()
    meta = SqliteMetadataStore(settings.data_dir / "injected.sqlite3")
    service = bootstrap.open_service(settings, connector=FakeConnector({}), meta=meta)
    try:
        assert service.ctx.meta is meta
        assert not (settings.data_dir / "kms.sqlite3").exists()
    finally:
        service.close()


def test_exposed_secret_is_refused_before_anything_is_opened(config: Path) -> None:
    settings = load_settings(config)
    settings.data_dir.mkdir()
    settings.master_key_file.write_bytes(b"x" * 32)
    settings.master_key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"master key file .* is world-readable"):
        bootstrap.open_service(settings, connector=FakeConnector({}))
    with pytest.raises(ConfigError, match=r"master key file .* is world-readable"):
        bootstrap.open_audit_log(settings)
    assert "HSMBRIDGE_TEST_BOOTSTRAP" not in os.environ
    assert not (settings.data_dir / "kms.sqlite3").exists()
    assert not settings.audit_log.exists()
