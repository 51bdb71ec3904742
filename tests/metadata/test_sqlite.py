"""SqliteMetadataStore's own rules: private files, WAL and pragmas, its schema version table and
the migration of old SQLite files, and the busy-lock translation. The behaviour every engine
shares is in test_store_contract.py."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
import threading
from dataclasses import replace

import pytest

from hsmbridge.errors import ConfigError, DependencyTimeoutException
from hsmbridge.metadata.sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteMetadataStore,
)
from hsmbridge.model import ConnectionState


@pytest.fixture
def store(db_path):
    """SQLite alone here (the shared `store` fixture is parametrized over every engine)."""
    s = SqliteMetadataStore(db_path)
    yield s
    s.close()


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
            for sql in migration:
                conn.execute(sql)
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


def test_a_write_lock_held_too_long_elsewhere_is_a_retryable_error(
    db_path, make_store_row, monkeypatch
):
    monkeypatch.setattr("hsmbridge.metadata.schema.BUSY_TIMEOUT_S", 0.2)
    holder, waiter = SqliteMetadataStore(db_path), SqliteMetadataStore(db_path)
    try:
        with holder.write():
            holder.put_key_store(make_store_row(1))
            with pytest.raises(DependencyTimeoutException) as caught, waiter.write():
                pass
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        with waiter.write():  # the lock is free again: no lasting harm
            waiter.put_key_store(make_store_row(2))
        assert waiter.count_key_stores() == 2
    finally:
        holder.close()
        waiter.close()


def test_instances_opening_a_new_file_together_all_open_it(tmp_path):
    # Two connections switching one new file to WAL at once: SQLite refuses one at once ("database
    # is locked", no busy wait); before the open retried it, the first round here already failed.
    for round_ in range(60):
        path = tmp_path / f"new-{round_}.db"
        opened, errors = [], []
        barrier = threading.Barrier(4)

        def start(path=path, opened=opened, errors=errors, barrier=barrier):
            barrier.wait()
            try:
                opened.append(SqliteMetadataStore(path))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for s in opened:
            s.close()
        assert errors == [], f"round {round_}"


def test_every_process_on_a_sqlite_file_holds_maintenance(db_path):
    # One server per file: its supervisor (or single process) is the only one that sweeps.
    a, b = SqliteMetadataStore(db_path), SqliteMetadataStore(db_path)
    try:
        assert (a.hold_maintenance(), b.hold_maintenance()) == (True, True)
        assert (a.shared, b.shared) == (False, False)
    finally:
        a.close()
        b.close()
