"""The metadata read cache never serves a row older than the last commit: commits by this
process, by another thread's connection and by another process are all seen on the next read."""

import ast
import multiprocessing
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from hsmbridge.metadata.read_cache import ReadCache
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.model import KeyState
from tests.metadata.conftest import make_key, make_store_row


@pytest.fixture
def db(tmp_path):
    store = SqliteMetadataStore(tmp_path / "meta.sqlite3")
    with store.write():
        store.put_key_store(make_store_row(0))
        store.put_key(make_key(0))
    yield store
    store.close()


KEY = make_key(0).key_id


def _disable_in_other_process(path, key_id):
    other = SqliteMetadataStore(path)
    with other.write():
        other.put_key(replace(other.get_key(key_id), base_state=KeyState.DISABLED))
    other.close()


def test_commit_by_another_process_is_seen_on_the_next_read(db):
    assert db.get_key(KEY).base_state is KeyState.ENABLED  # now cached
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_disable_in_other_process, args=(db.path, KEY))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert db.get_key(KEY).base_state is KeyState.DISABLED


def test_commit_by_another_thread_is_seen(db):
    assert db.get_key(KEY).base_state is KeyState.ENABLED

    def disable():
        with db.write():
            db.put_key(replace(db.get_key(KEY), base_state=KeyState.DISABLED))

    worker = threading.Thread(target=disable)
    worker.start()
    worker.join()
    assert db.get_key(KEY).base_state is KeyState.DISABLED


def test_a_transaction_reads_its_own_writes_and_a_rollback_leaves_the_cache_right(db):
    assert db.get_key(KEY).base_state is KeyState.ENABLED
    seen_inside = []

    def disable_then_fail():
        with db.write():
            db.put_key(replace(db.get_key(KEY), base_state=KeyState.DISABLED))
            seen_inside.append(db.get_key(KEY).base_state)  # own write, inside
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        disable_then_fail()
    assert seen_inside == [KeyState.DISABLED]
    assert db.get_key(KEY).base_state is KeyState.ENABLED
    with db.write():
        db.delete_key(KEY)
    assert db.get_key(KEY) is None


def test_unchanged_rows_are_served_without_reloading():
    token = [0]
    cache: ReadCache[int] = ReadCache(lambda: token[0])
    loads = []
    for _ in range(5):
        assert cache.get("k", lambda: loads.append(1) or 7) == 7
    assert len(loads) == 1
    cache.bump()
    cache.get("k", lambda: loads.append(1) or 7)
    assert len(loads) == 2


def test_a_new_change_token_reloads_and_an_equal_one_does_not():
    token = [0]
    cache: ReadCache[int] = ReadCache(lambda: token[0])
    loads = []
    cache.get("k", lambda: loads.append(1) or 7)
    token[0] = 1  # another connection committed
    cache.get("k", lambda: loads.append(1) or 7)
    cache.get("k", lambda: loads.append(1) or 7)
    assert len(loads) == 2


def test_another_thread_first_read_does_not_trust_entries_cached_before_it():
    cache: ReadCache[int] = ReadCache(lambda: 0)  # the same token on every thread
    loads = []
    cache.get("k", lambda: loads.append(1) or 7)
    worker = threading.Thread(target=lambda: cache.get("k", lambda: loads.append(1) or 7))
    worker.start()
    worker.join()
    assert len(loads) == 2


def test_the_cache_imports_no_database_driver():
    import hsmbridge.metadata.read_cache as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "threading", "collections.abc", "typing"}, imported
