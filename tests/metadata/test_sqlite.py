"""SqliteMetadataStore against a real database file: records, pagination, transactions, sharing."""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import pytest

from hsmbridge.errors import ConfigError
from hsmbridge.metadata.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    MetadataStoreClosedError,
    SqliteMetadataStore,
)
from hsmbridge.metadata.store import DeletedKey, MetadataStore
from hsmbridge.model import (
    ConnectionErrorCode,
    ConnectionState,
    KeyLifecycle,
    KeyState,
    Tag,
)


@contextlib.contextmanager
def _raw(db_path):
    # sqlite3's own context manager commits but does not close
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


# --- file, pragmas, schema ---------------------------------------------------------------------


def _as_protocol(store: SqliteMetadataStore) -> MetadataStore:
    return store  # mypy checks that SqliteMetadataStore structurally matches the Protocol


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(MetadataStore).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def test_implements_the_protocol(store):
    typed = _as_protocol(store)
    methods = _protocol_methods()
    assert {"write", "put_key", "keys_due_for_deletion", "deleted_keys", "close"} <= set(methods)
    mismatched = {}
    for name, wanted in methods.items():
        got = inspect.signature(getattr(typed, name))  # bound: `self` is gone
        params = [(p.name, p.kind, p.default) for p in wanted.parameters.values()][1:]
        if [(p.name, p.kind, p.default) for p in got.parameters.values()] != params:
            mismatched[name] = (str(wanted), str(got))
    # Every Protocol method, with the same parameter names, kinds and defaults (callers pass
    # several of them by keyword), whatever mypy was told about this module.
    assert mismatched == {}


def test_files_are_private(store, db_path, key_store_row):
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        sidecar = db_path.with_name(db_path.name + suffix)
        if sidecar.exists():
            assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600


def test_existing_file_is_tightened_to_0600(db_path):
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    SqliteMetadataStore(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_wal_and_schema_version(store, db_path):
    with _raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn = store._conn()
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_reopen_keeps_data_and_version(store, db_path, key_store_row):
    store.close()
    again = SqliteMetadataStore(db_path)
    try:
        assert again.get_key_store(key_store_row.store.store_id) == key_store_row
    finally:
        again.close()
    with _raw(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(store, db_path):
    store.close()
    with _raw(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this hsmbridge supports"):
        SqliteMetadataStore(db_path)


def test_a_v2_database_is_upgraded_with_no_failed_logins(db_path, make_store_row):
    """Schema v3 adds custom_key_stores.failed_logins; existing stores start with a count of 0."""
    row = make_store_row(7, connection_state=ConnectionState.CONNECTED)
    s = row.store
    with _raw(db_path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for migration in MIGRATIONS[:2]:
            migration(conn)
        conn.execute("INSERT INTO schema_version (version) VALUES (2)")
        conn.execute(
            """INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor_pem,
                   connection_state, connection_error_code, store_type, creation_date,
                   password_blob) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?)""",
            (
                s.store_id,
                s.name,
                s.cluster_id,
                s.trust_anchor_pem,
                s.connection_state.value,
                s.store_type.value,
                s.creation_date,
                row.password_blob,
            ),
        )
    upgraded = SqliteMetadataStore(db_path)
    try:
        assert upgraded.get_key_store(s.store_id) == row
        assert upgraded.failed_logins(s.store_id) == 0
        with upgraded.write():
            upgraded.set_failed_logins(s.store_id, 3)
        # put_key_store (every state change) leaves the count alone.
        upgraded.put_key_store(replace(row, store=replace(s, name="renamed")))
        assert upgraded.failed_logins(s.store_id) == 3
        assert upgraded.failed_logins("cks-missing") == 0
    finally:
        upgraded.close()
    with _raw(db_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_closed_store_refuses_use(store):
    store.close()
    with pytest.raises(MetadataStoreClosedError):
        store.count_key_stores()


# --- custom key stores -------------------------------------------------------------------------


def test_key_store_crud(store, make_store_row):
    row = make_store_row(1)
    store.put_key_store(row)
    assert store.get_key_store(row.store.store_id) == row
    assert store.get_key_store_by_name("store-1") == row
    assert store.get_key_store("cks-missing") is None
    assert store.get_key_store_by_name("nope") is None

    failed = make_store_row(
        1,
        name="renamed",
        connection_state=ConnectionState.FAILED,
        connection_error_code=ConnectionErrorCode.USER_LOGGED_IN,
    )
    store.put_key_store(failed)
    got = store.get_key_store(row.store.store_id)
    assert got == failed
    assert got.store.connection_state is ConnectionState.FAILED
    assert got.store.connection_error_code is ConnectionErrorCode.USER_LOGGED_IN
    assert isinstance(got.password_blob, bytes)
    assert store.get_key_store_by_name("store-1") is None
    assert store.count_key_stores() == 1

    store.delete_key_store(row.store.store_id)
    assert store.get_key_store(row.store.store_id) is None
    assert store.count_key_stores() == 0


def test_key_store_names_are_unique(store, make_store_row):
    store.put_key_store(make_store_row(1))
    with pytest.raises(sqlite3.IntegrityError):
        store.put_key_store(make_store_row(2, name="store-1"))


def test_key_store_pagination(store, make_store_row):
    rows = [make_store_row(n) for n in (5, 1, 3, 2, 4)]
    for row in rows:
        store.put_key_store(row)
    first = store.list_key_stores(2, None)
    assert [r.store.name for r in first] == ["store-1", "store-2"]
    second = store.list_key_stores(2, first[-1].store.store_id)
    assert [r.store.name for r in second] == ["store-3", "store-4"]
    third = store.list_key_stores(2, second[-1].store.store_id)
    assert [r.store.name for r in third] == ["store-5"]
    assert store.list_key_stores(2, third[-1].store.store_id) == []


# --- keys --------------------------------------------------------------------------------------


def test_key_crud_round_trips_every_field(store, key_store_row, make_key):
    key = make_key(1, deletion_date=1_800_000_000.5, pending_window_days=7)
    store.put_key(key)
    got = store.get_key(key.key_id)
    assert got == key
    assert got.base_state is KeyState.ENABLED
    assert got.lifecycle is KeyLifecycle.LIVE
    assert got.tags == (Tag("team", "crypto"), Tag("env", "test"))

    changed = replace(key, base_state=KeyState.DISABLED, tags=(), description="changed")
    store.put_key(changed)
    assert store.get_key(key.key_id) == changed
    assert store.get_key("00000000-0000-4000-8000-00000000ffff") is None


def test_key_needs_an_existing_store(store, make_key):
    with pytest.raises(sqlite3.IntegrityError):
        store.put_key(make_key(1, store_id="cks-doesnotexist000"))


def test_store_with_keys_cannot_be_deleted(store, key_store_row, make_key):
    store.put_key(make_key(1))
    with pytest.raises(sqlite3.IntegrityError):
        store.delete_key_store(key_store_row.store.store_id)


def test_list_keys_is_live_only_and_paginated(store, key_store_row, make_key):
    for n in range(1, 6):
        store.put_key(make_key(n))
    store.put_key(make_key(6, lifecycle=KeyLifecycle.CREATING))
    store.put_key(make_key(7, lifecycle=KeyLifecycle.DELETING))
    page1 = store.list_keys(3, None)
    page2 = store.list_keys(3, page1[-1].key_id)
    assert [k.description for k in page1 + page2] == [f"key {n}" for n in range(1, 6)]
    assert store.list_keys(3, page2[-1].key_id) == []


def test_keys_in_store_and_counts(store, key_store_row, make_store_row, make_key):
    other = make_store_row(9)
    store.put_key_store(other)
    store.put_key(make_key(1))
    store.put_key(make_key(2, lifecycle=KeyLifecycle.CREATING))
    store.put_key(make_key(3, store_id=other.store.store_id))
    sid = key_store_row.store.store_id
    assert [k.description for k in store.keys_in_store(sid)] == ["key 1", "key 2"]
    assert [k.description for k in store.keys_in_store(sid, KeyLifecycle.CREATING)] == ["key 2"]
    assert store.count_keys_in_store(sid) == 2
    assert store.count_keys_in_store(other.store.store_id) == 1
    assert store.count_keys_in_store("cks-none") == 0


def test_keys_due_for_deletion(store, key_store_row, make_key):
    pending = KeyState.PENDING_DELETION
    store.put_key(make_key(1, base_state=pending, deletion_date=100.0))  # due
    store.put_key(make_key(2, base_state=pending, deletion_date=200.0))  # not yet
    store.put_key(make_key(3, lifecycle=KeyLifecycle.DELETING))  # interrupted sweep
    store.put_key(make_key(4, base_state=KeyState.ENABLED, deletion_date=50.0))  # cancelled
    store.put_key(make_key(5, base_state=pending, deletion_date=150.0))  # due at 150
    due = store.keys_due_for_deletion(150.0)
    assert [k.description for k in due] == ["key 1", "key 3", "key 5"]


def test_delete_key_removes_its_aliases(store, key_store_row, make_key, make_alias):
    a, b = make_key(1), make_key(2)
    store.put_key(a)
    store.put_key(b)
    store.put_alias(make_alias("alias/a1", a))
    store.put_alias(make_alias("alias/a2", a))
    store.put_alias(make_alias("alias/b1", b))
    store.delete_key(a.key_id)
    assert store.get_key(a.key_id) is None
    assert store.get_alias("alias/a1") is None
    assert store.count_aliases(a.key_id) == 0
    assert store.get_alias("alias/b1") is not None


# --- aliases -----------------------------------------------------------------------------------


def test_alias_crud(store, key_store_row, make_key, make_alias):
    a, b = make_key(1), make_key(2)
    store.put_key(a)
    store.put_key(b)
    alias = make_alias("alias/app", a)
    store.put_alias(alias)
    assert store.get_alias("alias/app") == alias
    retargeted = replace(alias, target_key_id=b.key_id, last_updated_date=1_700_000_999.0)
    store.put_alias(retargeted)  # UpdateAlias
    assert store.get_alias("alias/app") == retargeted
    assert store.count_aliases(a.key_id) == 0
    assert store.count_aliases(b.key_id) == 1
    store.delete_alias("alias/app")
    assert store.get_alias("alias/app") is None
    store.delete_alias("alias/app")  # deleting a missing alias is a no-op


def test_alias_needs_an_existing_key(store, make_key, make_alias):
    with pytest.raises(sqlite3.IntegrityError):
        store.put_alias(make_alias("alias/orphan", make_key(42)))


def test_alias_listing_filters_and_paginates(store, key_store_row, make_key, make_alias):
    a, b = make_key(1), make_key(2)
    store.put_key(a)
    store.put_key(b)
    for name in ("alias/c", "alias/a", "alias/b"):
        store.put_alias(make_alias(name, a))
    store.put_alias(make_alias("alias/z", b))
    page = store.list_aliases(None, 2, None)
    assert [x.name for x in page] == ["alias/a", "alias/b"]
    assert [x.name for x in store.list_aliases(None, 2, "alias/b")] == ["alias/c", "alias/z"]
    assert [x.name for x in store.list_aliases(a.key_id, 10, "alias/a")] == ["alias/b", "alias/c"]
    assert [x.name for x in store.list_aliases(b.key_id, 10, None)] == ["alias/z"]
    assert store.count_aliases(a.key_id) == 3


# --- tombstones --------------------------------------------------------------------------------


def test_deleted_key_tombstones(store):
    t1 = DeletedKey("k1", "arn:k1", "cks-a", "cluster-abcdefghijk", 10.0, True)
    t2 = DeletedKey("k2", "arn:k2", "cks-b", "cluster-abcdefghijk", 5.0, False)
    store.record_deleted_key(t1)
    store.record_deleted_key(t2)
    assert list(store.deleted_keys()) == [t2, t1]
    assert list(store.deleted_keys("cks-a")) == [t1]
    assert list(store.deleted_keys("cks-none")) == []
    assert store.deleted_keys("cks-b").__next__().material_deleted is False


# --- transactions ------------------------------------------------------------------------------


def test_write_commits(store, make_store_row):
    with store.write():
        store.put_key_store(make_store_row(1))
        assert store.get_key_store_by_name("store-1") is not None  # own writes are visible
    assert store.count_key_stores() == 1


def test_write_rolls_back_on_exception(store, make_store_row):
    store.put_key_store(make_store_row(1))

    def failing() -> None:
        with store.write():
            store.put_key_store(make_store_row(2))
            store.delete_key_store(make_store_row(1).store.store_id)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    assert [r.store.name for r in store.list_key_stores(10, None)] == ["store-1"]
    with store.write():  # the connection is usable again
        store.put_key_store(make_store_row(3))
    assert store.count_key_stores() == 2


def test_nested_write_joins_outer(store, make_store_row):
    def failing_inner() -> None:
        with store.write():
            store.put_key_store(make_store_row(3))
            raise ValueError("inner")

    with store.write():
        store.put_key_store(make_store_row(1))
        with store.write():
            store.put_key_store(make_store_row(2))
        with pytest.raises(ValueError, match="inner"):
            failing_inner()
    # the caught inner failure undid only its own change
    assert [r.store.name for r in store.list_key_stores(10, None)] == ["store-1", "store-2"]


def test_inner_failure_propagating_rolls_back_everything(store, make_store_row):
    def failing() -> None:
        with store.write():
            store.put_key_store(make_store_row(1))
            with store.write():
                store.put_key_store(make_store_row(2))
                raise ValueError("inner")

    with pytest.raises(ValueError, match="inner"):
        failing()
    assert store.count_key_stores() == 0


def test_delete_key_inside_failed_write_keeps_aliases(store, key_store_row, make_key, make_alias):
    key = make_key(1)
    store.put_key(key)
    store.put_alias(make_alias("alias/x", key))

    def failing() -> None:
        with store.write():
            store.delete_key(key.key_id)
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        failing()
    assert store.get_key(key.key_id) == key
    assert store.get_alias("alias/x") is not None


def test_uncommitted_writes_are_invisible_to_other_threads(store, make_store_row):
    seen: list[int] = []
    inside = threading.Event()
    done = threading.Event()

    def reader():
        inside.wait(5)
        seen.append(store.count_key_stores())  # autocommit read, not blocked by the writer
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    with store.write():
        store.put_key_store(make_store_row(1))
        inside.set()
        assert done.wait(5)
    thread.join(5)
    assert seen == [0]
    assert store.count_key_stores() == 1


def test_two_threads_check_then_act_is_serialised(store, make_store_row):
    # Each transaction reads the count and inserts "store-<count>": without serialisation two
    # threads would read the same count and collide on the UNIQUE name.
    errors: list[BaseException] = []
    per_thread = 15

    def worker():
        try:
            for _ in range(per_thread):
                with store.write():
                    n = store.count_key_stores()
                    store.put_key_store(make_store_row(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    names = {r.store.name for r in store.list_key_stores(1000, None)}
    assert names == {f"store-{n}" for n in range(2 * per_thread)}


def test_another_process_sees_committed_writes(store, db_path, make_store_row):
    with store.write():
        store.put_key_store(make_store_row(7))
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from hsmbridge.metadata.sqlite import SqliteMetadataStore
        from hsmbridge.model import ConnectionState
        s = SqliteMetadataStore(Path({str(db_path)!r}))
        row = s.get_key_store_by_name("store-7")
        print(row.store.store_id, row.store.connection_state.value)
        with s.write():
            s.put_key_store(type(row)(
                store=type(row.store)(**{{**row.store.__dict__,
                    "connection_state": ConnectionState.CONNECTED}}),
                password_blob=row.password_blob))
        s.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [make_store_row(7).store.store_id, "DISCONNECTED"]
    # and this process sees the other process's commit
    got = store.get_key_store_by_name("store-7")
    assert got.store.connection_state is ConnectionState.CONNECTED
