"""HSM faults at random rates, injected at two depths, against a real SoftHSM token.

* Under the backend (`FaultyLibrary`): python-pkcs11 raises real DeviceError, SessionHandleInvalid,
  SessionClosed, TokenNotPresent, UserNotLoggedIn, FunctionFailed and OperationActive, so the
  backend's translation, tenacity retries, eviction, re-login and re-initialisation run for real.
  Most operations must succeed through retries; the rest must fail as KeyUnavailableException
  or DependencyTimeoutException (500s, which SDKs retry), never as anything else.
* Above the backend (`FaultyBackend`): the backend's own transient errors before or after the
  real call, so the service sees "the HSM did it but the answer was lost" on every method.

After each run, with injection off: every ciphertext that was returned decrypts, and the label
audit is clean: no intent rows, no LIVE key without material, no orphan or duplicate labels.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter

import pytest

from hsmbridge import bootstrap
from hsmbridge.errors import KmsError
from hsmbridge.model import KeyState
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService
from tests.callers import ADMIN
from tests.harness import KmsEnv
from tests.reliability import consistency
from tests.reliability.faults import (
    BACKEND_FAULTS,
    PKCS11_FAULTS,
    FaultyConnector,
    Injector,
    install_library_faults,
)

pytestmark = pytest.mark.softhsm

SEED = int(os.environ.get("HSMBRIDGE_FAULT_SEED", "20240611"))
OPS = int(os.environ.get("HSMBRIDGE_FAULT_OPS", "300"))
# The fault (HTTP 500) errors STYLE practice 2 reserves for "HSM busy or unreachable": SDKs retry.
RETRYABLE = {"KeyUnavailableException", "DependencyTimeoutException"}


class Mix:
    """A random mix of CreateKey, Encrypt, Decrypt and GenerateDataKey, with the outcomes."""

    def __init__(self, svc: KmsService, store_id: str, seed: int) -> None:
        self.svc, self.store_id = svc, store_id
        self.rng = random.Random(seed)
        self.keys: list[str] = []
        self.sealed: list[tuple[str, bytes, bytes]] = []  # (key ARN, blob, plaintext)
        self.ok: Counter[str] = Counter()
        self.failed: Counter[tuple[str, str, bool]] = Counter()  # (op, code, fault)

    def create(self) -> None:
        meta = self.svc.keys.create(
            ADMIN, CreateKeyRequest(custom_key_store_id=self.store_id, origin="AWS_CLOUDHSM")
        )
        self.keys.append(meta.arn)

    def step(self) -> None:
        roll = self.rng.random()
        op = "CreateKey" if not self.keys or roll < 0.2 else "Encrypt"
        if self.sealed and roll >= 0.6:
            op = "Decrypt" if roll < 0.85 else "GenerateDataKey"
        try:
            if op == "CreateKey":
                self.create()
            elif op == "Encrypt":
                plaintext = os.urandom(self.rng.randint(1, 64))
                out = self.svc.crypto.encrypt(ADMIN, self.rng.choice(self.keys), plaintext)
                self.sealed.append((out.key_arn, out.ciphertext_blob, plaintext))
            elif op == "Decrypt":
                _, blob, plaintext = self.rng.choice(self.sealed)
                assert self.svc.crypto.decrypt(ADMIN, blob).plaintext == plaintext
            else:
                key = self.rng.choice(self.keys)
                dk = self.svc.crypto.generate_data_key(ADMIN, key, number_of_bytes=32)
                self.sealed.append((dk.key_arn, dk.ciphertext_blob, dk.plaintext))
        except KmsError as exc:
            self.failed[(op, exc.code, exc.fault)] += 1
            return
        self.ok[op] += 1

    def verify_all_decrypt(self, gone: frozenset[str] = frozenset()) -> int:
        checked = 0
        for arn, blob, plaintext in self.sealed:
            if arn not in gone:
                assert self.svc.crypto.decrypt(ADMIN, blob).plaintext == plaintext
                checked += 1
        return checked


def _audit(svc: KmsService, store_id: str) -> consistency.Report:
    backend = svc.ctx.connections.peek(store_id)
    assert backend is not None
    records = svc.ctx.meta.keys_in_store(store_id)
    return consistency.check(
        consistency.labels_of(backend), records, svc.ctx.meta.deleted_keys(store_id)
    )


def _reconnect(svc: KmsService, store_id: str) -> None:
    """A fresh login, so the session pool is built through whatever library is installed now."""
    svc.keystores.disconnect(ADMIN, store_id)
    svc.keystores.connect(ADMIN, store_id)
    store = svc.keystores.describe(ADMIN, store_id).items[0]
    assert store.connection_state.value == "CONNECTED", store


def test_pkcs11_faults_are_retried_or_surface_as_retryable_errors(
    kms_env: KmsEnv, caplog: pytest.LogCaptureFixture
) -> None:
    svc, store_id = kms_env.svc, kms_env.store_id
    assert store_id is not None
    injector = Injector(SEED, 0.08, PKCS11_FAULTS)
    module = kms_env.settings.clusters[kms_env.cluster_id].profile.module_path
    caplog.set_level(logging.INFO, logger="hsmbridge")
    with install_library_faults(module, kms_env.token_label, injector) as library:
        _reconnect(svc, store_id)
        generation = library.generation
        mix = Mix(svc, store_id, SEED)
        injector.enabled = True
        for _ in range(OPS):
            mix.step()
        injector.enabled = False
        backend = svc.ctx.connections.peek(store_id)
        assert backend is not None
        stats = backend.stats  # type: ignore[attr-defined]
        mix.verify_all_decrypt()
        report = _audit(svc, store_id)
        generations = library.generation - generation
        svc.keystores.disconnect(ADMIN, store_id)  # leave no proxied session behind
    summary = {
        "ok": dict(mix.ok),
        "failed": {f"{op}/{code}": n for (op, code, _), n in mix.failed.items()},
        "injected": dict(injector.injected),
        "retries": stats.retries,
        "reinitialisations": generations,
    }
    print(summary)
    assert set(injector.injected) == {cls.__name__ for cls in PKCS11_FAULTS}, summary
    # Every failure that got through the retries is a retryable fault, never a 400 or a crash.
    assert all(code in RETRYABLE and fault for _, code, fault in mix.failed), summary
    assert sum(mix.ok.values()) >= 0.9 * OPS, summary
    assert stats.retries > 0
    assert generations > 0, "TokenNotPresent/DeviceError never re-initialised the library"
    assert "re-logged in" in caplog.text, "UserNotLoggedIn never led to a re-login"
    report.assert_clean("after PKCS#11 faults")
    assert report.live == len(mix.keys)


@pytest.mark.parametrize(
    ("fault", "times", "effect"),
    [
        ("TokenNotPresent", 1, "re-initialised"),
        ("DeviceError", 3, "re-initialised"),  # a streak of 3 means the device is lost
        ("UserNotLoggedIn", 1, "re-logged in"),
        ("SessionHandleInvalid", 2, None),
        ("OperationActive", 2, None),
    ],
)
def test_each_recovery_path_ends_in_success(
    kms_env: KmsEnv, caplog: pytest.LogCaptureFixture, fault: str, times: int, effect: str | None
) -> None:
    """Forced failures of one class on consecutive calls: the operation still succeeds."""
    svc, store_id = kms_env.svc, kms_env.store_id
    assert store_id is not None
    cls = {c.__name__: c for c in PKCS11_FAULTS}[fault]
    injector = Injector(SEED, 0.0, PKCS11_FAULTS)
    module = kms_env.settings.clusters[kms_env.cluster_id].profile.module_path
    caplog.set_level(logging.INFO, logger="hsmbridge")
    with install_library_faults(module, kms_env.token_label, injector):
        _reconnect(svc, store_id)
        mix = Mix(svc, store_id, SEED)
        mix.create()
        plaintext = b"survives " + fault.encode()
        blob = svc.crypto.encrypt(ADMIN, mix.keys[0], plaintext).ciphertext_blob
        injector.enabled = True
        # DeviceError streak: 3 in a row, and the tenacity budget is 3 attempts per call.
        injector.queue = [cls] * times
        assert svc.crypto.decrypt(ADMIN, blob).plaintext == plaintext
        assert injector.injected[fault] == times
        injector.queue = [cls] * times
        mix.create()
        injector.enabled = False
        if effect is not None:
            assert effect in caplog.text, [r.getMessage() for r in caplog.records]
        report = _audit(svc, store_id)
        svc.keystores.disconnect(ADMIN, store_id)
    report.assert_clean(f"after forced {fault}")


def test_backend_faults_surface_as_kms_errors_and_leave_nothing_half_done(
    kms_env: KmsEnv,
) -> None:
    """Backend errors before or after the real call (the HSM acted, the answer was lost)."""
    store_id = kms_env.store_id
    assert store_id is not None
    kms_env.close()
    settings = kms_env.settings
    injector = Injector(SEED, 0.15, BACKEND_FAULTS)
    connector = FaultyConnector(bootstrap.default_connector(settings), injector)
    svc = bootstrap.open_service(
        settings, connector=connector, clock=kms_env.clock, audit=kms_env.audit
    )
    kms_env.service = svc  # closed by the fixture
    mix = Mix(svc, store_id, SEED + 1)
    injector.enabled = True
    for _ in range(OPS // 2):
        mix.step()
    # Deletions with faults: schedule, let the waiting period pass, sweep (faults postpone).
    doomed = mix.keys[: len(mix.keys) // 2]
    for arn in doomed:
        svc.keys.schedule_deletion(ADMIN, arn, 7)
    kms_env.clock.advance(8 * 86_400)
    for _ in range(10):
        svc.recovery.sweep_once()
    injector.enabled = False
    svc.recovery.sweep_once()
    summary = {
        "ok": dict(mix.ok),
        "failed": {f"{op}/{code}": n for (op, code, _), n in mix.failed.items()},
        "injected": dict(injector.injected),
    }
    print(summary)
    assert all(code in RETRYABLE and fault for _, code, fault in mix.failed), summary
    assert mix.failed, "no fault reached the service"
    for arn in mix.keys:
        if arn not in doomed:
            assert svc.keys.describe(ADMIN, arn).key_state is KeyState.ENABLED
    assert mix.verify_all_decrypt(frozenset(doomed)) > 0
    report = _audit(svc, store_id)
    report.assert_clean("after backend faults")
    assert report.live == len(mix.keys) - len(doomed)
