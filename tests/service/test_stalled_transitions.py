"""A connect or disconnect whose process died is finished by the maintenance sweep.

ConnectCustomKeyStore records CONNECTING and logs in in the background; a process killed in
between (a worker, or an instance in front of a shared database) left the store CONNECTING until
some process started again. The sweep of the maintenance holder now finishes a transition it has
seen at two sweeps in a row, unless this process is still connecting that store itself.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Any

from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionState
from hsmbridge.service.keystores import KeyStoreService
from tests.callers import ADMIN
from tests.harness import KmsEnv


def _leave_in(env: KmsEnv, state: ConnectionState) -> str:
    """The store as a process that died mid-transition leaves it."""
    assert env.store_id is not None
    meta = env.svc.ctx.meta
    with meta.write():
        row = env.svc.ctx.store_row(env.store_id)
        store = replace(row.store, connection_state=state, connection_error_code=None)
        meta.put_key_store(StoredKeyStore(store, row.password_blob))
    env.svc.ctx.connections.close_all()
    return env.store_id


def _state(env: KmsEnv, store_id: str) -> ConnectionState:
    return env.svc.ctx.store_row(store_id).store.connection_state


def test_a_connect_left_by_a_dead_process_is_finished_at_the_second_sweep(fake_env) -> None:
    store_id = _leave_in(fake_env, ConnectionState.CONNECTING)
    recovery = fake_env.svc.recovery
    assert recovery.sweep_once() is True
    assert _state(fake_env, store_id) is ConnectionState.CONNECTING  # seen once: maybe live
    recovery.sweep_once()
    assert _state(fake_env, store_id) is ConnectionState.CONNECTED
    assert fake_env.svc.ctx.connections.peek(store_id) is not None  # logged in, as a connect does


def test_a_disconnect_left_by_a_dead_process_is_finished(fake_env) -> None:
    store_id = _leave_in(fake_env, ConnectionState.DISCONNECTING)
    fake_env.svc.recovery.sweep_once()
    fake_env.svc.recovery.sweep_once()
    assert _state(fake_env, store_id) is ConnectionState.DISCONNECTED


class _Parked(Executor):
    """Holds submitted connects: a connect this process has started and not finished."""

    def __init__(self) -> None:
        self.parked: list[tuple[Any, tuple[Any, ...]]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.parked.append((fn, args))
        return Future()


def test_a_connect_this_process_is_making_is_left_to_it(fake_env) -> None:
    assert fake_env.store_id is not None
    svc = fake_env.svc
    svc.keystores.disconnect(ADMIN, fake_env.store_id)
    parked = _Parked()
    svc.keystores = KeyStoreService(svc.ctx, parked)
    # The sweep asks the keystore service that holds the parked connect.
    svc.recovery._keystores = svc.keystores
    svc.keystores.connect(ADMIN, fake_env.store_id)
    assert svc.keystores.connecting_here() == {fake_env.store_id}
    for _ in range(3):
        svc.recovery.sweep_once()
    assert _state(fake_env, fake_env.store_id) is ConnectionState.CONNECTING
    fn, args = parked.parked[0]
    fn(*args)  # the connect finishes in its own time
    assert _state(fake_env, fake_env.store_id) is ConnectionState.CONNECTED
    assert svc.keystores.connecting_here() == set()
