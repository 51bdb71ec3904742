"""PostgresMetadataStore's own rules: versioned migrations under the write lock, refusal of a
newer schema, a database that is down or unreachable answering a retryable KMS error (and
recovering by itself), and a password in the URL that never shows. The behaviour both engines
share is in test_store_contract.py."""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from hsmbridge.errors import ConfigError, DependencyTimeoutException
from hsmbridge.metadata.postgres import PostgresMetadataStore
from hsmbridge.metadata.postgres_schema import MIGRATIONS, SCHEMA_VERSION
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.model import ConnectionState
from tests.postgres import start_server

pytestmark = pytest.mark.postgres
PASSWORD = "s3cret-Pa55"  # trust authentication accepts it; only its secrecy is under test


def _with_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"postgres:{PASSWORD}@{parts.hostname}:{parts.port}"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # free once closed: nothing listens there


def test_both_engines_build_the_same_tables_columns_and_keys(postgres_url, tmp_path):
    """One schema (metadata.ddl) in two dialects: the same tables, columns, nullability, primary
    keys, unique columns and foreign keys with their ON DELETE actions, read back from each
    engine's own catalogue."""
    PostgresMetadataStore(postgres_url).close()
    SqliteMetadataStore(tmp_path / "m.sqlite3").close()
    with psycopg.connect(postgres_url) as pg:
        pg_columns = {
            (t, c, n == "NO")
            for t, c, n in pg.execute(
                "SELECT table_name, column_name, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            )
        }
        pg_keys = {
            (t, c, kind, ref, action)
            for t, c, kind, ref, action in pg.execute(
                """SELECT tc.table_name, kcu.column_name, tc.constraint_type,
                          ccu.table_name, rc.delete_rule
                   FROM information_schema.table_constraints tc
                   JOIN information_schema.key_column_usage kcu
                     ON tc.constraint_name = kcu.constraint_name
                   LEFT JOIN information_schema.referential_constraints rc
                     ON tc.constraint_name = rc.constraint_name
                   LEFT JOIN information_schema.constraint_column_usage ccu
                     ON tc.constraint_type = 'FOREIGN KEY'
                    AND tc.constraint_name = ccu.constraint_name
                   WHERE tc.table_schema = 'public'"""
            )
        }
    lite = sqlite3.connect(tmp_path / "m.sqlite3")
    try:
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lite_columns, lite_keys = set(), set()
        for table in tables:
            for _, column, _, notnull, _, pk in lite.execute(f"PRAGMA table_info({table})"):
                lite_columns.add((table, column, bool(notnull or pk)))
                if pk:
                    lite_keys.add((table, column, "PRIMARY KEY", None, None))
            for fk in lite.execute(f"PRAGMA foreign_key_list({table})"):
                lite_keys.add((table, fk[3], "FOREIGN KEY", fk[2], fk[6]))
            for index in lite.execute(f"PRAGMA index_list({table})"):
                if index[2] and index[3] == "u":  # a UNIQUE column constraint
                    for info in lite.execute(f"PRAGMA index_info({index[1]})"):
                        lite_keys.add((table, info[2], "UNIQUE", None, None))
    finally:
        lite.close()
    assert pg_columns == lite_columns
    assert pg_keys == lite_keys
    assert len(tables) == 7  # the six tables and schema_version


def test_schema_version_is_recorded_and_a_newer_one_refused(postgres_url):
    PostgresMetadataStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this hsmbridge supports") as caught:
        PostgresMetadataStore(_with_password(postgres_url))
    assert PASSWORD not in str(caught.value)


def test_a_v2_database_is_upgraded_with_no_failed_logins(postgres_url, make_store_row):
    row = make_store_row(7, connection_state=ConnectionState.CONNECTED)
    s = row.store
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for migration in MIGRATIONS[:2]:
            for sql in migration:
                conn.execute(sql)
        conn.execute("INSERT INTO schema_version (version) VALUES (2)")
        conn.execute(
            """INSERT INTO custom_key_stores (id, name, cluster_id, trust_anchor_pem,
                   connection_state, connection_error_code, store_type, creation_date,
                   password_blob) VALUES (%s, %s, %s, %s, %s, NULL, %s, %s, %s)""",
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
    upgraded = PostgresMetadataStore(postgres_url)
    try:
        assert upgraded.get_key_store(s.store_id) == row
        assert upgraded.failed_logins(s.store_id) == 0
    finally:
        upgraded.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_the_password_never_shows(postgres_url, caplog):
    url = _with_password(postgres_url)
    store = PostgresMetadataStore(url)
    try:
        assert PASSWORD not in repr(store)
        assert "postgres:***@" in repr(store)
    finally:
        store.close()
    missing = url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(DependencyTimeoutException) as caught:
        PostgresMetadataStore(missing, pool_timeout_s=1.0)
    assert 'database "no_such_database" does not exist' in str(caught.value)  # says why
    assert PASSWORD not in str(caught.value)
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


def test_an_unreachable_server_is_a_retryable_error_at_start_up(caplog):
    url = f"postgresql://kms:{PASSWORD}@127.0.0.1:{_closed_port()}/kms"
    began = time.monotonic()
    with pytest.raises(DependencyTimeoutException) as caught:
        PostgresMetadataStore(url, pool_timeout_s=1.0)
    assert time.monotonic() - began < 10
    assert caught.value.fault  # a server fault: SDKs retry it
    assert "kms:***@127.0.0.1" in caught.value.message
    assert PASSWORD not in caught.value.message
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # its own server, stopped and started again
def test_a_database_that_goes_down_fails_fast_and_recovers_by_itself(
    tmp_path, make_store_row, caplog
):
    server, _ = start_server(tmp_path / "pg")
    try:
        url = _with_password(server.url("postgres"))
        store = PostgresMetadataStore(url, pool_timeout_s=1.0)
        store.put_key_store(make_store_row(1))
        server.stop("fast")
        for call in (store.count_key_stores, store.write().__enter__):
            began = time.monotonic()
            with pytest.raises(DependencyTimeoutException) as caught:
                call()
            assert time.monotonic() - began < 5
            assert "Try again" in caught.value.message
        server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.count_key_stores() == 1
                break
            except DependencyTimeoutException:
                assert time.monotonic() < deadline, "the pool did not reconnect"
        with store.write():
            store.put_key_store(make_store_row(2))
        assert store.count_key_stores() == 2
        store.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("unavailable" in w for w in warnings)
        assert all(PASSWORD not in w for w in warnings)
    finally:
        server.stop()


def test_one_process_holds_maintenance_until_it_closes_or_its_connection_dies(postgres_url):
    """The session advisory lock behind hold_maintenance: one holder among every store on the
    database, kept across rounds, released by close() or by the holder's connection dying (as
    when its process is killed), and then taken by the next store that asks."""
    a, b = PostgresMetadataStore(postgres_url), PostgresMetadataStore(postgres_url)
    try:
        assert a.hold_maintenance() is True
        assert b.hold_maintenance() is False
        assert a.hold_maintenance() is True  # kept across rounds
        assert b.hold_maintenance() is False
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'hsmbridge-maintenance'"
            ).fetchall()
        assert killed == [(True,)]
        assert _eventually(b.hold_maintenance)  # the server let the dead session's lock go
        assert a.hold_maintenance() is False  # a noticed, reconnected, and is not the holder
        b.close()
        assert a.hold_maintenance() is True
    finally:
        a.close()
        b.close()


def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())
