"""The login watch: a store disconnected or deleted through one instance has its HSM login closed
in every other instance sharing the metadata, without a request having to touch it.

Two `KmsService`s over one SQLite file and one in-memory HSM token stand for two processes (each
has its own metadata connection and its own logins, as another process would). The same watch
across real worker processes of `hsmbridge serve` is in
tests/operability/test_serve_processes.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hsmbridge import bootstrap
from hsmbridge.model import ConnectionState
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService
from hsmbridge.service.login_watch import LoginWatch
from tests.callers import ADMIN
from tests.harness import KmsEnv


def _second_instance(env: KmsEnv) -> KmsService:
    settings = env.settings
    assert env.connector is not None
    return bootstrap.open_service(
        settings, connector=env.connector(settings), clock=env.clock, synchronous_connect=True
    )


def _logged_in(svc: KmsService, env: KmsEnv) -> str:
    """One Encrypt through `svc`, so it holds its own login of the store; the key's id."""
    assert env.store_id is not None
    request = CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
    key_id = env.svc.keys.create(ADMIN, request).key_id
    svc.crypto.encrypt(ADMIN, key_id, b"logs in")
    assert svc.ctx.connections.peek(env.store_id) is not None
    return key_id


def test_a_store_disconnected_elsewhere_loses_its_login_here(fake_env: KmsEnv) -> None:
    other = _second_instance(fake_env)
    _logged_in(other, fake_env)
    store_id = fake_env.store_id
    assert store_id is not None
    try:
        watch = LoginWatch(other.ctx)
        assert watch.watch_once() == 0  # CONNECTED: the login stays
        assert other.ctx.connections.peek(store_id) is not None

        fake_env.svc.keystores.disconnect(ADMIN, store_id)
        row = other.ctx.meta.get_key_store(store_id)
        assert row is not None
        assert row.store.connection_state is ConnectionState.DISCONNECTED
        assert watch.watch_once() == 1
        assert other.ctx.connections.peek(store_id) is None
        assert watch.watch_once() == 0  # nothing left to close; it never logs in
    finally:
        other.close()


def test_the_running_watch_closes_it_within_its_interval(fake_env: KmsEnv) -> None:
    other = _second_instance(fake_env)
    other.start(sweep_interval_s=None, recover=False, watch_interval_s=0.05)
    store_id = fake_env.store_id
    assert store_id is not None
    try:
        _logged_in(other, fake_env)
        time.sleep(0.2)  # several rounds while CONNECTED: the login survives them
        assert other.ctx.connections.peek(store_id) is not None
        fake_env.svc.keystores.disconnect(ADMIN, store_id)
        assert _within(2.0, lambda: other.ctx.connections.peek(store_id) is None)
    finally:
        other.close()


def test_the_watch_closes_only_the_login_it_saw(fake_env: KmsEnv) -> None:
    """The watch closes the login it saw before reading the row, never a newer one: a store
    reconnected meanwhile keeps the login its reconnect made."""
    other = _second_instance(fake_env)
    key_id = _logged_in(other, fake_env)
    store_id = fake_env.store_id
    assert store_id is not None
    connections = other.ctx.connections
    try:
        stale = connections.peek(store_id)
        assert stale is not None
        fake_env.svc.keystores.disconnect(ADMIN, store_id)
        fake_env.svc.keystores.connect(ADMIN, store_id)
        # This instance still holds its old login: the same object stays closeable, a new one
        # does not match it.
        connections.detach(store_id)
        other.crypto.encrypt(ADMIN, key_id, b"again")
        fresh = connections.peek(store_id)
        assert fresh is not None
        assert fresh is not stale
        assert connections.detach_if_same(store_id, stale) is False
        assert connections.peek(store_id) is fresh
    finally:
        other.close()


def _within(seconds: float, check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()
