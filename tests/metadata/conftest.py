"""Fixtures for the metadata stores: each engine on a real database (a SQLite file, a fresh
database on the session's PostgreSQL server), parametrized by `engine`, and record factories.

`store` is the `MetadataStore` under test, opened through `open_metadata_store(url)` as the
service opens it; `open_store()` opens another instance on the same database (another process
or host, as far as the engine can tell). `test_sqlite.py` overrides `store` with SQLite alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from hsmbridge.config import sqlite_url
from hsmbridge.metadata.factory import open_metadata_store
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.metadata.store import MetadataStore, StoredKeyStore
from hsmbridge.model import Alias, ConnectionState, CustomKeyStore, KeyRecord, KeyState, Tag

ACCOUNT = "111122223333"
REGION = "us-east-1"
CLUSTER = "cluster-abcdefghijk"


def make_store_row(n: int = 0, **changes) -> StoredKeyStore:
    store = CustomKeyStore(
        store_id=f"cks-{n:017x}",
        name=f"store-{n}",
        cluster_id=CLUSTER,
        trust_anchor_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        connection_state=ConnectionState.DISCONNECTED,
        creation_date=1_700_000_000.0 + n,
    )
    return StoredKeyStore(store=replace(store, **changes), password_blob=b"\x01sealed" + bytes([n]))


def make_key(n: int = 0, store_id: str = "cks-00000000000000000", **changes) -> KeyRecord:
    key_id = f"{n:08x}-0000-4000-8000-000000000000"
    record = KeyRecord(
        key_id=key_id,
        arn=f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}",
        account_id=ACCOUNT,
        region=REGION,
        custom_key_store_id=store_id,
        cluster_id=CLUSTER,
        description=f"key {n}",
        base_state=KeyState.ENABLED,
        creation_date=1_700_000_100.0 + n,
        policy='{"Version":"2012-10-17","Statement":[]}',
        tags=(Tag("team", "crypto"), Tag("env", "test")),
    )
    return replace(record, **changes)


def make_alias(name: str, key: KeyRecord) -> Alias:
    return Alias(
        name=name,
        arn=f"arn:aws:kms:{REGION}:{ACCOUNT}:{name}",
        target_key_id=key.key_id,
        creation_date=1_700_000_200.0,
        last_updated_date=1_700_000_300.0,
    )


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "metadata.sqlite3"


ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def metadata_url(engine: str, request: pytest.FixtureRequest, db_path) -> str:
    """The URL of a new, empty database of `engine`."""
    if engine == "sqlite":
        return sqlite_url(db_path)
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def open_store(metadata_url: str) -> Iterator[Callable[[], MetadataStore]]:
    """Factory: another instance of the store on the test's database; closed after the test."""
    opened: list[MetadataStore] = []

    def make() -> MetadataStore:
        s = open_metadata_store(metadata_url)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[[], MetadataStore]) -> MetadataStore:
    return open_store()


@pytest.fixture
def sqlite_store(db_path) -> Iterator[SqliteMetadataStore]:
    s = SqliteMetadataStore(db_path)
    yield s
    s.close()


@pytest.fixture
def key_store_row(store):
    """A persisted key store that keys can reference (keys have a foreign key to it)."""
    row = make_store_row(0)
    store.put_key_store(row)
    return row


# Factories as fixtures, so test modules never import conftest by name.
@pytest.fixture(name="make_store_row")
def _make_store_row_fixture():
    return make_store_row


@pytest.fixture(name="make_key")
def _make_key_fixture():
    return make_key


@pytest.fixture(name="make_alias")
def _make_alias_fixture():
    return make_alias
