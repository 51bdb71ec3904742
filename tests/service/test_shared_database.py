"""Instances sharing one metadata database: start-up spares the others' CreateKeys in flight, and
the once-per-database background work runs in one of them.

On one server's SQLite file, start-up runs before any of its processes serves, so every CREATING
intent it finds was interrupted and is rolled back at once. On PostgreSQL another instance may be
serving right now: an intent younger than the in-flight grace may be its request, so a starting
instance rolls back only older ones (a dead instance's young intents go at the next stale
sweep). Sweeps (due deletions, stale intents) run in the one process holding the database's
maintenance lock, so a due key is deleted once, whichever instance ticks.

Instances are `KmsService`s over one database and one in-memory HSM token (as two hosts in front
of one cluster); the intents are planted as a CreateKey leaves them: the row, then the HSM key
labelled with its ARN.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from hsmbridge import bootstrap
from hsmbridge.config import sqlite_url
from hsmbridge.metadata.factory import open_metadata_store
from hsmbridge.model import KeyLifecycle, KeyRecord
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService
from hsmbridge.service.recovery import IN_FLIGHT_GRACE_S
from tests.callers import ADMIN
from tests.fake_hsm import FakeHsm
from tests.harness import KmsEnv, MemorySink
from tests.metadata.conftest import make_key


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "shared.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def instances(
    make_fake_env, fake_hsm: FakeHsm, database: str
) -> Iterator[tuple[KmsEnv, list[KmsService]]]:
    env: KmsEnv = make_fake_env(store=False)
    made: list[KmsService] = []

    def instance() -> KmsService:
        settings = env.settings
        svc = bootstrap.open_service(
            settings,
            connector=fake_hsm.connector(settings),
            clock=env.clock,
            audit=MemorySink(),
            meta=open_metadata_store(database),
            synchronous_connect=True,
        )
        made.append(svc)
        return svc

    first = instance()
    env.store_id = first.keystores.create(
        ADMIN, "Shared", env.cluster_id, env.pki.ca_cert_pem, env.password
    )
    first.keystores.connect(ADMIN, env.store_id)
    yield env, [first, instance()]
    for svc in made:
        svc.close()


def _plant(svc: KmsService, env: KmsEnv, n: int, age_s: float) -> KeyRecord:
    """A CreateKey's intent `age_s` old (row first, then the HSM key, as CreateKey orders them)."""
    assert env.store_id is not None
    row = svc.ctx.store_row(env.store_id)
    record = replace(
        make_key(n, env.store_id),
        cluster_id=row.store.cluster_id,
        lifecycle=KeyLifecycle.CREATING,
        creation_date=env.clock() - age_s,
    )
    with svc.ctx.meta.write():
        svc.ctx.meta.put_key(record)
    svc.hsm.login(row).generate_key(record.arn, record.key_id.encode())
    return record


def _labels(svc: KmsService, env: KmsEnv, record: KeyRecord) -> int:
    assert env.store_id is not None
    return len(svc.hsm.login(svc.ctx.store_row(env.store_id)).find_keys(record.arn))


def test_a_starting_instance_spares_young_intents_only_on_a_shared_database(
    instances: tuple[KmsEnv, list[KmsService]], database: str
) -> None:
    env, (serving, starting) = instances
    young = _plant(serving, env, 1, age_s=1.0)  # `serving`'s CreateKey, still in flight
    old = _plant(serving, env, 2, age_s=IN_FLIGHT_GRACE_S + 1.0)
    shared = database.startswith("postgresql")
    assert starting.ctx.meta.shared is shared

    starting.start(sweep_interval_s=None, watch_interval_s=None)

    meta = starting.ctx.meta
    assert meta.get_key(old.key_id) is None
    assert _labels(starting, env, old) == 0
    if shared:
        got = meta.get_key(young.key_id)
        assert got is not None
        assert got.lifecycle is KeyLifecycle.CREATING
        assert _labels(starting, env, young) == 1
    else:  # one server's file: nothing else can be serving while it starts
        assert meta.get_key(young.key_id) is None
        assert _labels(starting, env, young) == 0


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgres"], indirect=True)
def test_a_due_key_is_deleted_once_whichever_instance_sweeps(
    instances: tuple[KmsEnv, list[KmsService]],
) -> None:
    env, (first, second) = instances
    assert env.store_id is not None
    request = CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
    keys = [svc.keys.create(ADMIN, request).key_id for svc in (first, second)]
    for svc, key_id in zip((first, second), keys, strict=True):
        svc.keys.schedule_deletion(ADMIN, key_id, 7)
    env.clock.advance(8 * 86_400)

    swept = [(first.recovery.sweep_once(), second.recovery.sweep_once()) for _ in range(3)]
    assert swept == [(True, False)] * 3  # the first to ask holds it, round after round
    assert all(first.ctx.meta.get_key(k) is None for k in keys)
    deletes = [
        e.key_arn
        for svc in (first, second)
        for e in svc.ctx.audit.events
        if e.event_name == "DeleteKey"
    ]
    assert sorted(a.rsplit("/", 1)[1] for a in deletes) == sorted(keys)  # once each

    first.close()  # its lock goes with its connection: the other instance takes over
    assert second.recovery.sweep_once() is True
