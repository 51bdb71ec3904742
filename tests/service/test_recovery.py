"""Crash safety of key creation and deletion, and the deletion sweeper (issue 2).

A crash is simulated by a metadata store that raises at a chosen write, which is where a killed
process would stop: after the HSM call, before the commit that makes the change visible. The
service is then restarted over the same SQLite file and token, start-up recovery runs, and the
invariant is checked: every LIVE key's ARN labels exactly one HSM key, every HSM key's label is a
LIVE key's ARN, and no CREATING/DELETING row is left.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from hsmbridge.backend import TransientHsmError
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.errors import DependencyTimeoutException, NotFoundException
from hsmbridge.metadata.store import MetadataStore
from hsmbridge.model import ConnectionState, KeyLifecycle, KeyRecord
from hsmbridge.service.connections import StoreConnections
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.recovery import IN_FLIGHT_GRACE_S, STALE_INTENT_S
from tests.callers import ADMIN
from tests.harness import KmsEnv
from tests.service.checks import assert_consistent, backend, hsm_labels, rows

pytestmark = pytest.mark.softhsm
DAY = 86_400


class SimulatedCrashError(Exception):
    """Stands for the process dying at this point; nothing in the service catches it."""


class CrashingMeta:
    """Delegates to the real store, but "dies" at the first write matching `crash_on`."""

    def __init__(self, inner: MetadataStore, method: str, when: Any = None) -> None:
        self._inner, self._method, self._when = inner, method, when
        self.crashed = False

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        if name != self._method or self.crashed:
            return real

        def maybe_crash(*args: Any) -> Any:
            if self._when is None or self._when(*args):
                self.crashed = True
                raise SimulatedCrashError(name)
            return real(*args)

        return maybe_crash


def _create(env: KmsEnv) -> str:
    req = CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
    return env.svc.keys.create(ADMIN, req).key_id


def _crash_in(env: KmsEnv, method: str, when: Any = None) -> CrashingMeta:
    crashing = CrashingMeta(env.svc.ctx.meta, method, when)
    env.svc.ctx.meta = crashing  # type: ignore[assignment]
    return crashing


def _live(record: KeyRecord) -> bool:
    return record.lifecycle is KeyLifecycle.LIVE


def test_crash_between_hsm_call_and_live_commit_is_rolled_back_at_start(kms_env) -> None:
    keep = _create(kms_env)
    _crash_in(kms_env, "put_key", _live)
    with pytest.raises(SimulatedCrashError):
        _create(kms_env)
    # The crash left exactly the half-state recovery must handle: an intent row and material.
    [intent] = [r for r in rows(kms_env) if r.key_id != keep]
    assert intent.lifecycle is KeyLifecycle.CREATING
    assert hsm_labels(kms_env)[intent.arn] == 1
    with pytest.raises(NotFoundException):
        kms_env.svc.keys.describe(ADMIN, intent.key_id)  # an intent is never visible to clients
    assert [r.key_id for r in kms_env.svc.keys.list(ADMIN, None, None).items] == [keep]

    kms_env.restart().start(sweep_interval_s=None)
    assert [r.key_id for r in rows(kms_env)] == [keep]
    assert_consistent(kms_env)
    _create(kms_env)  # and the store works normally afterwards
    assert_consistent(kms_env)


class CrashingBackend:
    """A real backend whose C_GenerateKey is never reached: the process dies just before it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate_key(self, label: str, key_id: bytes, **kwargs: Any) -> Any:
        raise SimulatedCrashError("generate_key")


def test_crash_before_hsm_call_leaves_only_an_intent_that_recovery_removes(kms_env) -> None:
    ctx = kms_env.svc.ctx
    real = Pkcs11Connector(kms_env.settings.clusters)

    class Connector:
        def connect(self, cluster_id: str, password: str) -> Any:
            return CrashingBackend(real.connect(cluster_id, password))

    ctx.connections.close_all()
    ctx.connections = StoreConnections(Connector())
    with pytest.raises(SimulatedCrashError):
        _create(kms_env)
    [intent] = rows(kms_env)
    assert intent.lifecycle is KeyLifecycle.CREATING
    assert sum(hsm_labels(kms_env).values()) == 0
    kms_env.restart().start(sweep_interval_s=None)
    assert rows(kms_env) == []
    assert_consistent(kms_env)


def test_crash_recovered_when_the_store_connects_instead_of_at_start(kms_env) -> None:
    _crash_in(kms_env, "put_key", _live)
    with pytest.raises(SimulatedCrashError):
        _create(kms_env)
    svc = kms_env.restart()
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    svc.start(sweep_interval_s=None)  # a DISCONNECTED store cannot be reconciled yet
    assert [r.lifecycle for r in rows(kms_env)] == [KeyLifecycle.CREATING]
    # Right after a connect, other worker processes may be serving the store: an intent younger
    # than the grace may belong to a live request, so the on_connected hook spares it...
    svc.keystores.connect(ADMIN, kms_env.store_id)
    assert [r.lifecycle for r in rows(kms_env)] == [KeyLifecycle.CREATING]
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    # ...and rolls it back once it is too old for that (the supervisor's sweep does the same).
    kms_env.clock.advance(IN_FLIGHT_GRACE_S + 1)
    svc.keystores.connect(ADMIN, kms_env.store_id)
    assert rows(kms_env) == []
    assert_consistent(kms_env)


def test_the_maintenance_sweep_rolls_back_intents_older_than_five_minutes(kms_env) -> None:
    """A worker that dies mid-CreateKey leaves an intent no restart will see while the server
    runs: the supervisor's periodic sweep rolls it back once it is older than STALE_INTENT_S
    (5 minutes), and not before (a younger one may belong to a live request)."""
    assert STALE_INTENT_S == 300.0  # what the README promises
    _crash_in(kms_env, "put_key", _live)
    with pytest.raises(SimulatedCrashError):
        _create(kms_env)
    svc = kms_env.restart()  # a server already running: no start-up recovery
    [intent] = rows(kms_env)
    assert intent.lifecycle is KeyLifecycle.CREATING
    assert hsm_labels(kms_env)[intent.arn] == 1
    kms_env.clock.advance(STALE_INTENT_S - 1)
    svc.recovery.sweep_once()
    assert [r.key_id for r in rows(kms_env)] == [intent.key_id]
    kms_env.clock.advance(2)
    svc.recovery.sweep_once()
    assert rows(kms_env) == []
    assert hsm_labels(kms_env)[intent.arn] == 0
    assert_consistent(kms_env)


@pytest.mark.parametrize("crash_at", ["after_deleting_commit", "after_destroy"])
def test_interrupted_deletion_is_finished_at_start(kms_env, crash_at: str) -> None:
    svc = kms_env.svc
    keep, doomed = _create(kms_env), _create(kms_env)
    svc.aliases.create(ADMIN, "alias/doomed", doomed)
    doomed_arn = svc.keys.describe(ADMIN, doomed).arn
    svc.keys.schedule_deletion(ADMIN, doomed, 7)
    kms_env.clock.advance(7 * DAY + 1)
    if crash_at == "after_deleting_commit":
        _crash_in(kms_env, "get_key_store")  # _finish_deletion's first read after the flip
    else:
        _crash_in(kms_env, "record_deleted_key")  # material destroyed, row still DELETING
    with pytest.raises(SimulatedCrashError):
        svc.deletions.sweep()
    states = {r.key_id: r.lifecycle for r in rows(kms_env)}
    assert states == {keep: KeyLifecycle.LIVE, doomed: KeyLifecycle.DELETING}
    assert hsm_labels(kms_env)[doomed_arn] == (1 if crash_at == "after_deleting_commit" else 0)

    kms_env.audit.events.clear()
    svc = kms_env.restart()
    svc.start(sweep_interval_s=None)
    assert [r.key_id for r in rows(kms_env)] == [keep]
    assert svc.ctx.meta.get_alias("alias/doomed") is None
    assert_consistent(kms_env)
    [event] = [e for e in kms_env.audit.events if e.event_name == "DeleteKey"]
    assert event.key_arn == doomed_arn
    [status] = event.additional["backingKeysDeletionStatus"]
    assert status["deletionStatus"] == "SUCCESS"
    [tomb] = list(svc.ctx.meta.deleted_keys(kms_env.store_id))
    assert (tomb.key_id, tomb.material_deleted) == (doomed, True)


def test_sweeper_deletes_metadata_aliases_and_material_when_due(kms_env) -> None:
    svc = kms_env.svc
    keep, doomed = _create(kms_env), _create(kms_env)
    svc.aliases.create(ADMIN, "alias/doomed", doomed)
    arn = svc.keys.describe(ADMIN, doomed).arn
    scheduled = svc.keys.schedule_deletion(ADMIN, doomed, 7)
    assert scheduled.deletion_date == kms_env.clock.now + 7 * DAY
    kms_env.clock.advance(7 * DAY - 1)
    assert svc.deletions.sweep() == 0  # not yet due
    assert backend(kms_env).find_keys(arn)
    kms_env.clock.advance(2)
    assert svc.deletions.sweep() == 1
    assert svc.ctx.meta.get_key(doomed) is None
    assert svc.ctx.meta.get_alias("alias/doomed") is None
    assert backend(kms_env).find_keys(arn) == []
    with pytest.raises(NotFoundException):
        svc.keys.describe(ADMIN, doomed)
    [event] = [e for e in kms_env.audit.events if e.event_name == "DeleteKey"]
    assert event.key_arn == arn
    assert event.custom_key_store_id == kms_env.store_id
    assert event.additional["eventType"] == "AwsServiceEvent"
    assert event.additional["clusterId"] == kms_env.cluster_id
    assert event.additional["backingKeys"] == [{"backingKeyId": doomed, "keyLabel": arn}]
    assert event.additional["backingKeysDeletionStatus"] == [
        {"backingKeyId": doomed, "deletionStatus": "SUCCESS", "objectsDestroyed": 1}
    ]
    assert svc.deletions.sweep() == 0  # nothing twice
    assert [r.key_id for r in rows(kms_env)] == [keep]
    assert_consistent(kms_env)


def test_sweeper_while_disconnected_orphans_material_and_records_failure(kms_env) -> None:
    svc = kms_env.svc
    doomed = _create(kms_env)
    svc.aliases.create(ADMIN, "alias/doomed", doomed)
    arn = svc.keys.describe(ADMIN, doomed).arn
    svc.keys.schedule_deletion(ADMIN, doomed, 7)
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    kms_env.clock.advance(7 * DAY + 1)
    assert svc.deletions.sweep() == 1
    assert svc.ctx.meta.get_key(doomed) is None
    assert svc.ctx.meta.get_alias("alias/doomed") is None
    [event] = [e for e in kms_env.audit.events if e.event_name == "DeleteKey"]
    [status] = event.additional["backingKeysDeletionStatus"]
    assert (status["deletionStatus"], status["objectsDestroyed"]) == ("FAILURE", 0)
    [tomb] = list(svc.ctx.meta.deleted_keys(kms_env.store_id))
    assert (tomb.key_id, tomb.arn, tomb.material_deleted) == (doomed, arn, False)
    # KMS leaves the material orphaned in the cluster; so do we.
    svc.keystores.connect(ADMIN, kms_env.store_id)
    assert [k.label for k in backend(kms_env).find_keys(arn)] == [arn]
    # With the store empty of KMS keys it can be deleted, orphan or not.
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    svc.keystores.delete(ADMIN, kms_env.store_id)


def test_connect_and_disconnect_interrupted_by_a_crash_are_finished_at_start(
    make_kms_env,
) -> None:
    # Two stores cannot share a cluster, so each transition gets its own environment.
    c = ConnectionState
    for frozen, final in ((c.CONNECTING, c.CONNECTED), (c.DISCONNECTING, c.DISCONNECTED)):
        env = make_kms_env()
        env.svc.keystores.disconnect(ADMIN, env.store_id)
        ctx = env.svc.ctx
        row = ctx.store_row(env.store_id)
        with ctx.meta.write():  # the state a crash mid-transition leaves in the DB
            ctx.meta.put_key_store(replace(row, store=replace(row.store, connection_state=frozen)))
        env.restart().start(sweep_interval_s=None)
        assert env.svc.keystores.describe(ADMIN, env.store_id).items[0].connection_state is final
        if final is ConnectionState.CONNECTED:
            _create(env)
            assert_consistent(env)


class ReplyLostBackend(CrashingBackend):
    """The HSM made the key, but the reply was lost (a network blip on CloudHSM)."""

    def generate_key(self, label: str, key_id: bytes, **kwargs: Any) -> Any:
        self._inner.generate_key(label, key_id, **kwargs)
        raise TransientHsmError("reply lost after C_GenerateKey")


def test_hsm_error_after_the_key_was_made_leaves_neither_row_nor_material(kms_env) -> None:
    ctx = kms_env.svc.ctx
    real = Pkcs11Connector(kms_env.settings.clusters)

    class Connector:
        def connect(self, cluster_id: str, password: str) -> Any:
            return ReplyLostBackend(real.connect(cluster_id, password))

    ctx.connections.close_all()
    ctx.connections = StoreConnections(Connector())
    # Retryable for SDKs (503); CreateKey's model lists DependencyTimeout, not KeyUnavailable.
    with pytest.raises(DependencyTimeoutException):
        _create(kms_env)
    assert rows(kms_env) == []
    assert sum(hsm_labels(kms_env).values()) == 0


def test_a_deletion_finished_twice_is_recorded_once_and_never_resurrected(kms_env) -> None:
    # Two processes (the sweeper and recovery after a connect) can both pick the same expired
    # key; the one that comes second holds a stale copy of the row.
    svc = kms_env.svc
    key_id = _create(kms_env)
    svc.keys.schedule_deletion(ADMIN, key_id, 7)
    kms_env.clock.advance(7 * 86_400 + 1)
    [stale] = svc.ctx.meta.keys_due_for_deletion(kms_env.clock())
    assert svc.deletions.sweep() == 1
    svc.deletions.finish(stale)  # the second finisher, with its stale copy
    assert svc.ctx.meta.get_key(key_id) is None
    assert [t.key_id for t in svc.ctx.meta.deleted_keys()] == [key_id]
    deletes = [e for e in kms_env.audit.events if e.event_name == "DeleteKey"]
    assert len(deletes) == 1
    assert_consistent(kms_env)
