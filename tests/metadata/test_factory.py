"""The metadata engine is chosen by the URL's scheme: SQLite for `sqlite:///`, PostgreSQL for
`postgresql://`, anything else is a ConfigError that says which schemes are supported (and creates
nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsmbridge.config import METADATA_SCHEMES
from hsmbridge.errors import ConfigError
from hsmbridge.metadata.factory import ENGINES, open_metadata_store
from hsmbridge.metadata.postgres import PostgresMetadataStore
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from tests.metadata.conftest import make_store_row


def test_sqlite_url_opens_the_sqlite_store_at_that_path(tmp_path: Path) -> None:
    path = tmp_path / "kms.sqlite3"
    store = open_metadata_store(f"sqlite:///{path}")
    try:
        assert isinstance(store, SqliteMetadataStore)
        assert store.path == path
        with store.write():
            store.put_key_store(make_store_row(0))
        assert store.count_key_stores() == 1
    finally:
        store.close()
    assert path.is_file()


def test_relative_sqlite_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_metadata_store("sqlite:///rel.sqlite3")
    store.close()
    assert (tmp_path / "rel.sqlite3").is_file()


@pytest.mark.parametrize(
    "url",
    ["mysql://db/kms", "sqlite3:///x.db", "x.db", "postgres://db/kms"],
)
def test_other_urls_are_refused_naming_the_supported_schemes(tmp_path: Path, url: str) -> None:
    before = os.listdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        open_metadata_store(url)
    message = str(caught.value)
    assert url in message
    if "://" in url:
        assert "supported schemes: sqlite, postgresql" in message, message
    assert os.listdir(tmp_path) == before


def test_every_scheme_configuration_accepts_has_an_engine() -> None:
    assert set(ENGINES) == set(METADATA_SCHEMES)


@pytest.mark.postgres
def test_postgresql_url_opens_the_postgresql_store(postgres_url: str) -> None:
    store = open_metadata_store(postgres_url)
    try:
        assert isinstance(store, PostgresMetadataStore)
        store.put_key_store(make_store_row(0))
        assert store.count_key_stores() == 1
    finally:
        store.close()
