"""The `MetadataStore` contract, run against every engine (the `engine` fixture: SQLite and a
real PostgreSQL): records round-trip, the schema's rules, byte-order paging, the crash-safety
marks (KeyLifecycle intent rows, deletion marks, tombstones), grants, failed logins, and `write()`:
one serialised transaction across threads, processes and instances, nested calls joining it,
reads outside it seeing the last commit."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import pytest

from hsmbridge.metadata.postgres import PostgresMetadataStore
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.metadata.store import (
    DeletedKey,
    MetadataConflictError,
    MetadataStore,
    MetadataStoreClosedError,
)
from hsmbridge.model import (
    ConnectionErrorCode,
    ConnectionState,
    Grant,
    GrantConstraints,
    KeyLifecycle,
    KeyState,
    Tag,
)


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(MetadataStore).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


# mypy checks structural conformance where the factory returns each engine as a MetadataStore.
@pytest.mark.parametrize("cls", [SqliteMetadataStore, PostgresMetadataStore])
def test_implements_the_protocol(cls):
    methods = _protocol_methods()
    assert {"write", "put_key", "keys_due_for_deletion", "deleted_keys", "close"} <= set(methods)
    mismatched = {}
    for name, wanted in methods.items():
        got = inspect.signature(getattr(cls, name))
        params = [(p.name, p.kind, p.default) for p in wanted.parameters.values()]
        if [(p.name, p.kind, p.default) for p in got.parameters.values()] != params:
            mismatched[name] = (str(wanted), str(got))
    # Every Protocol method, with the same parameter names, kinds and defaults (callers pass
    # several of them by keyword), whatever mypy was told about this module.
    assert mismatched == {}


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
    with pytest.raises(MetadataConflictError):
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
    with pytest.raises(MetadataConflictError):
        store.put_key(make_key(1, store_id="cks-doesnotexist000"))


def test_store_with_keys_cannot_be_deleted(store, key_store_row, make_key):
    store.put_key(make_key(1))
    with pytest.raises(MetadataConflictError):
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
    with pytest.raises(MetadataConflictError):
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


def test_another_process_sees_committed_writes(store, metadata_url, make_store_row):
    with store.write():
        store.put_key_store(make_store_row(7))
    script = textwrap.dedent(
        f"""
        from hsmbridge.metadata.factory import open_metadata_store
        from hsmbridge.model import ConnectionState
        s = open_metadata_store({metadata_url!r})
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


def test_two_instances_check_then_act_is_serialised(open_store, make_store_row):
    # As above, but each thread has its own store instance, as two hsmbridge processes or hosts
    # would: the lock must be the database's, not the process's.
    first, second = open_store(), open_store()
    errors: list[BaseException] = []
    per_instance = 10

    def worker(s):
        try:
            for _ in range(per_instance):
                with s.write():
                    n = s.count_key_stores()
                    s.put_key_store(make_store_row(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    names = {r.store.name for r in first.list_key_stores(1000, None)}
    assert names == {f"store-{n}" for n in range(2 * per_instance)}


_CHECK_THEN_ACT = """
import sys
from dataclasses import replace
from hsmbridge.metadata.factory import open_metadata_store
from tests.metadata.conftest import make_store_row
s = open_metadata_store(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with s.write():
        n = s.count_key_stores()
        s.put_key_store(make_store_row(n))
s.close()
"""


@pytest.mark.slow  # two interpreters
def test_two_processes_check_then_act_is_serialised(store, metadata_url):
    per_process = 10
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHECK_THEN_ACT, metadata_url, str(per_process)])
        for _ in range(2)
    ]
    assert [p.wait(120) for p in procs] == [0, 0]
    names = {r.store.name for r in store.list_key_stores(1000, None)}
    assert len(names) == 2 * per_process


def test_reads_outside_write_see_another_instances_last_commit(open_store, key_store_row, make_key):
    reader, writer = open_store(), open_store()
    key = make_key(1)
    writer.put_key(key)
    assert reader.get_key(key.key_id) == key  # read once (a cache, if any, now holds it)
    with writer.write():
        writer.put_key(replace(key, base_state=KeyState.DISABLED))
    assert reader.get_key(key.key_id).base_state is KeyState.DISABLED
    with writer.write():
        writer.delete_key(key.key_id)
    assert reader.get_key(key.key_id) is None


def test_instances_starting_together_migrate_once(open_store, make_store_row):
    opened, errors = [], []

    def start():
        try:
            opened.append(open_store())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    opened[0].put_key_store(make_store_row(1))
    assert [s.count_key_stores() for s in opened] == [1, 1, 1, 1]


# --- the schema's rules, the same on every engine ---------------------------------------------


def test_two_stores_may_name_one_cluster_the_service_decides(store, make_store_row):
    # "A cluster serves one custom key store" is the service's check (CloudHsmClusterInUse,
    # made inside write()), not a constraint: the schema accepts both rows on every engine.
    store.put_key_store(make_store_row(1))
    store.put_key_store(make_store_row(2))
    assert {r.store.cluster_id for r in store.list_key_stores(10, None)} == {"cluster-abcdefghijk"}


def test_a_store_name_freed_by_a_rename_can_be_reused(store, make_store_row):
    store.put_key_store(make_store_row(1))
    store.put_key_store(make_store_row(1, name="renamed"))
    store.put_key_store(make_store_row(2, name="store-1"))
    assert store.get_key_store_by_name("store-1").store.store_id == make_store_row(2).store.store_id


def test_one_alias_per_name(store, key_store_row, make_key, make_alias):
    a, b = make_key(1), make_key(2)
    store.put_key(a)
    store.put_key(b)
    store.put_alias(make_alias("alias/one", a))
    store.put_alias(make_alias("alias/one", b))  # the name is the key: an upsert, not a second row
    assert [x.target_key_id for x in store.list_aliases(None, 10, None)] == [b.key_id]


def test_a_failed_change_inside_write_rolls_the_transaction_back(store, make_store_row, make_key):
    def store_then_orphan_key() -> None:
        with store.write():
            store.put_key_store(make_store_row(1))
            store.put_key(make_key(1, store_id="cks-doesnotexist000"))

    with pytest.raises(MetadataConflictError):
        store_then_orphan_key()
    assert store.count_key_stores() == 0


# --- paging order: bytes, whatever the database's collation ------------------------------------

# Code-point order, which is UTF-8 byte order: what SQLite's BINARY collation gives, and what
# PostgreSQL gives only with COLLATE "C" (the test databases use an ICU collation).
ODD_NAMES = [
    "alias/B",
    "alias/a",
    "alias/_x",
    "alias/-y",
    "alias/Z",
    "alias/b",
    "alias/é",
    "alias/z",
]


def test_alias_paging_is_in_byte_order(store, key_store_row, make_key, make_alias):
    key = make_key(1)
    store.put_key(key)
    for name in ODD_NAMES:
        store.put_alias(make_alias(name, key))
    seen, after = [], None
    while page := store.list_aliases(None, 3, after):
        seen += [a.name for a in page]
        after = page[-1].name
    assert seen == sorted(ODD_NAMES)
    assert [a.name for a in store.list_aliases(key.key_id, 100, "alias/Z")] == [
        n for n in sorted(ODD_NAMES) if n > "alias/Z"
    ]


def test_store_and_grant_paging_is_in_byte_order(store, key_store_row, make_store_row, make_key):
    store_ids = ["cks-Bb", "cks-aa", "cks-_c", "cks-Ab"]
    for n, sid in enumerate(store_ids, start=1):
        store.put_key_store(make_store_row(n, store_id=sid))
    listed = [r.store.store_id for r in store.list_key_stores(100, "cks-00000000000000000")]
    assert listed == sorted(store_ids)
    key = make_key(1)
    store.put_key(key)
    grant_ids = ["aB", "Ab", "_a", "ab", "A_"]
    for gid in grant_ids:
        store.put_grant(_grant(gid, key.key_id))
    assert [g.grant_id for g in store.list_grants(key.key_id, 100, None)] == sorted(grant_ids)
    page = store.list_grants(key.key_id, 2, "A_")
    assert [g.grant_id for g in page] == sorted(grant_ids)[1:3]


# --- grants ------------------------------------------------------------------------------------


def _grant(grant_id, key_id, **changes):
    grant = Grant(
        grant_id=grant_id,
        key_id=key_id,
        key_arn=f"arn:aws:kms:us-east-1:111122223333:key/{key_id}",
        name="",
        grantee_principal="arn:aws:iam::111122223333:user/alice",
        retiring_principal=None,
        issuing_account="arn:aws:iam::111122223333:root",
        operations=("Encrypt", "Decrypt"),
        constraints=None,
        creation_date=1_700_000_400.0,
    )
    return replace(grant, **changes)


def test_grant_crud_round_trips_every_field(store, key_store_row, make_key):
    key = make_key(1)
    store.put_key(key)
    grant = _grant(
        "g1",
        key.key_id,
        name="app",
        retiring_principal="arn:aws:iam::111122223333:user/bob",
        constraints=GrantConstraints(equals=(("k", "v"),), subset=None),
    )
    store.put_grant(grant)
    assert store.get_grant("g1") == grant
    subset = replace(grant, constraints=GrantConstraints(equals=None, subset=(("a", "b"),)))
    store.put_grant(subset)  # the grant id is the key: replaced, not added
    assert store.get_grant("g1") == subset
    assert store.count_grants(key.key_id) == 1
    store.delete_grant("g1")
    assert store.get_grant("g1") is None
    store.delete_grant("g1")  # deleting a missing grant is a no-op


def test_grant_needs_an_existing_key(store, make_key):
    with pytest.raises(MetadataConflictError):
        store.put_grant(_grant("g1", make_key(42).key_id))


def test_grant_queries(store, key_store_row, make_key):
    a, b = make_key(1), make_key(2)
    store.put_key(a)
    store.put_key(b)
    bob, carol = "arn:aws:iam::111122223333:user/bob", "arn:aws:iam::111122223333:user/carol"
    store.put_grant(_grant("g3", a.key_id, grantee_principal=bob, name="n"))
    store.put_grant(_grant("g1", a.key_id, retiring_principal=carol))
    store.put_grant(_grant("g2", a.key_id, name="n", retiring_principal=carol))
    store.put_grant(_grant("g4", b.key_id, grantee_principal=bob, retiring_principal=carol))
    ids = lambda grants: [g.grant_id for g in grants]  # noqa: E731
    assert ids(store.list_grants(a.key_id, 2, None)) == ["g1", "g2"]
    assert ids(store.list_grants(a.key_id, 2, "g2")) == ["g3"]
    assert ids(store.list_grants(a.key_id, 10, None, grantee=bob)) == ["g3"]
    assert ids(store.grants_for(a.key_id, (bob, "arn:aws:iam::111122223333:user/alice"))) == [
        "g1",
        "g2",
        "g3",
    ]
    assert store.grants_for(a.key_id, ()) == []
    assert ids(store.grants_named(a.key_id, "n")) == ["g2", "g3"]
    assert ids(store.retirable_grants(carol, 2, None)) == ["g1", "g2"]
    assert ids(store.retirable_grants(carol, 2, "g2")) == ["g4"]
    assert store.count_grants(a.key_id) == 3
    store.delete_key(a.key_id)  # a grant dies with its key
    assert store.count_grants(a.key_id) == 0
    assert store.get_grant("g1") is None
    assert ids(store.retirable_grants(carol, 10, None)) == ["g4"]


# --- failed kmsuser logins ---------------------------------------------------------------------


def test_failed_logins_are_counted_per_store_and_survive_store_updates(store, make_store_row):
    row = make_store_row(1)
    store.put_key_store(row)
    assert store.failed_logins(row.store.store_id) == 0
    with store.write():
        store.set_failed_logins(row.store.store_id, 3)
    store.put_key_store(make_store_row(1, connection_state=ConnectionState.CONNECTED))
    assert store.failed_logins(row.store.store_id) == 3
    assert store.failed_logins("cks-missing") == 0
    store.set_failed_logins("cks-missing", 5)  # no row: nothing to count
    assert store.failed_logins("cks-missing") == 0


def test_a_console_sign_out_is_seen_by_every_instance_until_its_session_expires(open_store):
    one, other = open_store(), open_store()
    one.record_sign_out("nonce-a", expires_at=2_000.0, now=1_000.0)
    one.record_sign_out("nonce-a", expires_at=2_000.0, now=1_000.0)  # signing out twice is fine
    other.record_sign_out("nonce-b", expires_at=3_000.0, now=1_500.0)
    assert (one.signed_out("nonce-b"), other.signed_out("nonce-a")) == (True, True)
    assert not one.signed_out("nonce-c")
    # A sign-out is kept no longer than its session would have lasted: each new one prunes.
    other.record_sign_out("nonce-c", expires_at=4_000.0, now=2_500.0)
    assert not one.signed_out("nonce-a")
    assert one.signed_out("nonce-b")
    assert one.signed_out("nonce-c")


# --- the crash-safety marks --------------------------------------------------------------------


def test_a_creating_intent_row_is_hidden_from_listing_but_found_for_recovery(
    store, key_store_row, make_key
):
    intent = make_key(1, lifecycle=KeyLifecycle.CREATING)
    store.put_key(intent)  # written before the HSM key exists
    sid = key_store_row.store.store_id
    assert store.list_keys(10, None) == []
    assert store.get_key(intent.key_id) == intent
    assert store.keys_in_store(sid, KeyLifecycle.CREATING) == [intent]
    assert store.count_keys_in_store(sid) == 1  # it still holds the store
    live = replace(intent, lifecycle=KeyLifecycle.LIVE)
    store.put_key(live)  # the HSM key exists: the intent becomes the key
    assert store.list_keys(10, None) == [live]
    assert store.keys_in_store(sid, KeyLifecycle.CREATING) == []


def test_a_deletion_mark_then_removal_with_its_tombstone(store, key_store_row, make_key):
    key = make_key(1, base_state=KeyState.PENDING_DELETION, deletion_date=100.0)
    store.put_key(key)
    assert store.keys_due_for_deletion(100.0) == [key]
    marked = replace(key, lifecycle=KeyLifecycle.DELETING)
    with store.write():
        store.put_key(marked)  # before the HSM object is destroyed
    assert store.list_keys(10, None) == []
    assert store.keys_due_for_deletion(0.0) == [marked]  # a sweep interrupted here resumes
    tomb = DeletedKey(key.key_id, key.arn, key.custom_key_store_id, key.cluster_id, 101.0, True)
    with store.write():
        store.delete_key(key.key_id)
        store.record_deleted_key(tomb)
    assert store.keys_due_for_deletion(1e12) == []
    assert list(store.deleted_keys(key.custom_key_store_id)) == [tomb]
    again = replace(tomb, material_deleted=False, deleted_at=102.0)
    store.record_deleted_key(again)  # one tombstone per key id
    assert list(store.deleted_keys()) == [again]
