"""Fixtures for the SQLite metadata store: a real database file and record factories."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.metadata.store import StoredKeyStore
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


@pytest.fixture
def store(db_path):
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
