"""Failed kmsuser logins on a fake HSM (hardening finding F8): hsmbridge backs off and stops
before the HSM locks the crypto user.

The profile the fake env names (softhsm2) sets `login_lockout_threshold = 5`, as CloudHSM locks
a crypto user at the 5th failed login: hsmbridge must never make more than 4 in a row, counted
across processes through the metadata, and must wait out a backoff per process between them.
An officer changing kmsuser's password behind a CONNECTED store's back is `FakeHsm.set_pin`
followed by a restart (a process that holds no login yet). The same on SoftHSM2:
test_login_budget_softhsm.py.
"""

from __future__ import annotations

import logging

import pytest

from hsmbridge import bootstrap
from hsmbridge.backend import HsmConnector, HsmUnreachableError
from hsmbridge.config import load_profile
from hsmbridge.errors import (
    CustomKeyStoreInvalidStateException,
    KeyUnavailableException,
    KmsError,
    KMSInvalidStateException,
)
from hsmbridge.model import ConnectionErrorCode, ConnectionState
from hsmbridge.service.kms import KmsService
from tests.callers import ADMIN
from tests.fake_hsm import FakeHsm
from tests.harness import SOFTHSM2_PROFILE, FakeClock, KmsEnv
from tests.service.steps import new_key, store_state

C = ConnectionState
THRESHOLD = load_profile(SOFTHSM2_PROFILE).login_lockout_threshold
NEW_PASSWORD = "officer-set-pass1"
FAILED_CREDENTIALS = (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)


def _stale_store(make_fake_env, fake_hsm: FakeHsm) -> tuple[KmsEnv, FakeClock, str]:
    """A CONNECTED store with a key whose kmsuser password an officer changed on the HSM, and a
    service restarted since (no login held), its backoff on a fake monotonic clock."""
    env = make_fake_env()
    key = new_key(env)
    fake_hsm.set_pin(env.token_label, NEW_PASSWORD)
    env.login_clock = FakeClock(0.0)
    env.restart()
    assert store_state(env) == (C.CONNECTED, None)
    return env, env.login_clock, key


def _encrypt(svc: KmsService, key: str) -> type[KmsError] | None:
    """Encrypt with the key; the KMS error class it raised, None when it worked."""
    try:
        svc.crypto.encrypt(ADMIN, key, b"payload")
    except KmsError as exc:
        return type(exc)
    return None


def _spend_budget(env: KmsEnv, clock: FakeClock, key: str) -> None:
    """Requests, each after the longest backoff, until the store goes FAILED."""
    for _ in range(THRESHOLD * 2):
        clock.advance(61)
        if _encrypt(env.svc, key) is KMSInvalidStateException:
            return
    pytest.fail("the store never went FAILED")


def test_the_threshold_comes_from_the_profiles() -> None:
    assert THRESHOLD == 5
    assert load_profile(SOFTHSM2_PROFILE.parent / "cloudhsm.toml").login_lockout_threshold == 5


def test_stale_password_backs_off_then_stops_one_short_of_the_lockout(
    make_fake_env, fake_hsm, caplog
) -> None:
    caplog.set_level(logging.INFO)
    env, clock, key = _stale_store(make_fake_env, fake_hsm)
    stale = env.password

    # A failed login answers what it answered before (a retryable fault), once per backoff.
    assert _encrypt(env.svc, key) is KeyUnavailableException
    assert fake_hsm.failed_logins == 1
    for _ in range(5):
        assert _encrypt(env.svc, key) is KeyUnavailableException
    assert fake_hsm.failed_logins == 1  # negative cache: the HSM was not asked again
    # The backoff doubles: 1 s after the first failure, 2 s after the second, 4 s ...
    for waited, failures in ((1, 2), (2, 3), (4, 4)):
        clock.advance(waited - 0.1)
        assert _encrypt(env.svc, key) is KeyUnavailableException
        assert fake_hsm.failed_logins == failures - 1, waited
        clock.advance(0.2)
        _encrypt(env.svc, key)
        assert fake_hsm.failed_logins == failures, waited

    # Budget spent: FAILED for everyone, and its keys are Unavailable as in any FAILED store.
    assert fake_hsm.failed_logins == THRESHOLD - 1
    assert store_state(env) == FAILED_CREDENTIALS
    assert env.svc.ctx.connections.peek(env.store_id) is None
    clock.advance(3600)
    for _ in range(3):
        with pytest.raises(KMSInvalidStateException, match="unavailable"):
            env.svc.crypto.encrypt(ADMIN, key, b"payload")
    assert fake_hsm.failed_logins == THRESHOLD - 1

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "kmsuser" in r.msg]
    assert [r.getMessage().rsplit("; ", 1)[1] for r in warnings] == [
        f"{n} attempt(s) left" for n in (3, 2, 1, 0)
    ]
    assert all(env.store_id in r.getMessage() for r in warnings)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert env.store_id in errors[0].getMessage()
    assert "stopped" in errors[0].getMessage()
    for record in caplog.records:
        assert stale not in record.getMessage()
        assert NEW_PASSWORD not in record.getMessage()


def test_two_processes_together_stay_one_short_of_the_lockout(make_fake_env, fake_hsm) -> None:
    env, clock_a, key = _stale_store(make_fake_env, fake_hsm)
    clock_b = FakeClock(0.0)
    settings = env.settings
    assert env.connector is not None
    other = bootstrap.open_service(
        settings,
        connector=env.connector(settings),
        clock=env.clock,
        synchronous_connect=True,
        login_clock=clock_b,
    )
    try:
        answers = []
        for _ in range(THRESHOLD * 2):
            for svc, clock in ((env.svc, clock_a), (other, clock_b)):
                clock.advance(61)  # no backoff left: only the shared budget holds them back
                answers.append(_encrypt(svc, key))
        assert fake_hsm.failed_logins == THRESHOLD - 1
        assert answers[: THRESHOLD - 1] == [KeyUnavailableException] * (THRESHOLD - 1)
        assert set(answers[THRESHOLD - 1 :]) == {KMSInvalidStateException}
        assert store_state(env) == FAILED_CREDENTIALS
        assert other.ctx.connections.peek(env.store_id) is None
    finally:
        other.close()


def test_connect_with_the_budget_spent_fails_without_a_login_until_the_password_is_updated(
    make_fake_env, fake_hsm
) -> None:
    env, clock, key = _stale_store(make_fake_env, fake_hsm)
    ks, sid = env.svc.keystores, env.store_id
    _spend_budget(env, clock, key)
    logins, failed = fake_hsm.logins, fake_hsm.failed_logins
    with pytest.raises(CustomKeyStoreInvalidStateException):
        ks.connect(ADMIN, sid)  # a FAILED store must be disconnected first, as in KMS
    ks.disconnect(ADMIN, sid)
    assert env.svc.ctx.meta.failed_logins(sid) == THRESHOLD - 1  # disconnect keeps the count
    ks.connect(ADMIN, sid)
    assert store_state(env) == FAILED_CREDENTIALS
    assert (fake_hsm.logins, fake_hsm.failed_logins) == (logins, failed)  # no C_Login at all

    # The KMS runbook: disconnect, UpdateCustomKeyStore(KeyStorePassword), connect.
    ks.disconnect(ADMIN, sid)
    ks.update(ADMIN, sid, password=NEW_PASSWORD)
    assert env.svc.ctx.meta.failed_logins(sid) == 0
    ks.connect(ADMIN, sid)
    assert store_state(env) == (C.CONNECTED, None)
    assert fake_hsm.logins == logins + 1
    assert _encrypt(env.svc, key) is None

    # The budget is whole again: a second stale password gets the same 4 attempts.
    fake_hsm.set_pin(env.token_label, NEW_PASSWORD + "x")
    env.restart()
    _spend_budget(env, clock, key)
    assert fake_hsm.failed_logins == failed + THRESHOLD - 1


def test_a_successful_login_clears_the_count_and_the_backoff(make_fake_env, fake_hsm) -> None:
    env, clock, key = _stale_store(make_fake_env, fake_hsm)
    for _ in range(THRESHOLD - 2):
        clock.advance(61)
        assert _encrypt(env.svc, key) is KeyUnavailableException
    assert env.svc.ctx.meta.failed_logins(env.store_id) == THRESHOLD - 2
    fake_hsm.set_pin(env.token_label, env.password)  # the officer puts the old password back
    clock.advance(61)
    assert _encrypt(env.svc, key) is None
    assert env.svc.ctx.meta.failed_logins(env.store_id) == 0
    # Logged out (a restart), the password changes again: the count starts from 0.
    fake_hsm.set_pin(env.token_label, NEW_PASSWORD)
    env.restart()
    assert _encrypt(env.svc, key) is KeyUnavailableException
    clock.advance(1.1)
    _encrypt(env.svc, key)
    assert env.svc.ctx.meta.failed_logins(env.store_id) == 2
    assert store_state(env) == (C.CONNECTED, None)


class _Flaky:
    """An HsmConnector whose network can be cut: HsmUnreachableError without reaching the HSM."""

    def __init__(self, inner: HsmConnector) -> None:
        self.inner = inner
        self.down = False
        self.attempts = 0

    def connect(self, cluster_id: str, password: str):
        self.attempts += 1
        if self.down:
            raise HsmUnreachableError("the HSM did not answer")
        return self.inner.connect(cluster_id, password)


def test_network_failures_consume_no_budget_and_set_no_backoff(make_fake_env, fake_hsm) -> None:
    env, clock, key = _stale_store(make_fake_env, fake_hsm)
    inner = env.connector
    assert inner is not None
    net = _Flaky(inner(env.settings))
    env.connector = lambda settings: net
    env.restart()
    assert _encrypt(env.svc, key) is KeyUnavailableException  # bad credentials: 1 counted
    net.down = True
    clock.advance(61)
    for _ in range(10):
        assert _encrypt(env.svc, key) is KeyUnavailableException
    assert net.attempts == 11  # each request tried: nothing to back off from
    assert env.svc.ctx.meta.failed_logins(env.store_id) == 1
    assert store_state(env) == (C.CONNECTED, None)
    net.down = False
    _spend_budget(env, clock, key)
    assert fake_hsm.failed_logins == THRESHOLD - 1
    assert store_state(env) == FAILED_CREDENTIALS
