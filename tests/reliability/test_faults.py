"""HSM faults at random rates, injected at two depths, against a real SoftHSM token.

* Under the backend (`FaultyLibrary`): python-pkcs11 raises real DeviceError, SessionHandleInvalid,
  SessionClosed, TokenNotPresent, UserNotLoggedIn, FunctionFailed and OperationActive, so the
  backend's translation, tenacity retries, eviction, re-login and re-initialisation run for real.
  Most operations must succeed through retries; the rest must fail as KeyUnavailableException
  or DependencyTimeoutException (500s, which SDKs retry), never as anything else.
* Above the backend (`FaultyBackend`): the backend's own transient errors before or after the
  real call, so the service sees "the HSM did it but the answer was lost" on every method.

After each run, with injection off: every ciphertext that was returned decrypts, and the label
audit is clean: no intent rows, no LIVE key without material, no orphan or duplicate labels. The
audit reads the token with pkcs11-tool (another process, not the backend under test) and checks
that our backend lists the same labels.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hsmbridge import bootstrap
from hsmbridge.backend import HsmKeyInfo
from hsmbridge.backend.sessions import load_library
from hsmbridge.config import ClusterBinding
from hsmbridge.errors import KmsError
from hsmbridge.model import KeyState
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService
from tests import pkcs11_tool
from tests.callers import ADMIN
from tests.conftest import SoftHsmEnv
from tests.harness import KmsEnv
from tests.reliability import consistency
from tests.reliability.faults import (
    BACKEND_FAULTS,
    PKCS11_FAULTS,
    FaultyConnector,
    Injector,
    install_library_faults,
)
from tests.service import checks

pytestmark = pytest.mark.softhsm


@pytest.fixture(scope="module")
def private_module(softhsm_env: SoftHsmEnv, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the run's PKCS#11 module (SoftHSM2, or the CloudHSM stand-in) for this file's
    environments. Loaded under its own path it is a separate library in this process, with its
    own C_Initialize state, so the re-initialisations these faults cause never reach the library
    that other tests' backends (the session-wide e2e server among them) share."""
    module = Path(softhsm_env.profile.module_path)
    path = tmp_path_factory.mktemp("faults-module") / f"{module.stem}-faults.so"
    shutil.copy(module, path)
    return str(path)


@pytest.fixture
def softhsm_token(
    softhsm_token: Callable[..., tuple[ClusterBinding, str]], private_module: str
) -> Callable[..., tuple[ClusterBinding, str]]:
    """The shared token factory, with every binding on the private copy of the module."""

    def make(label: str | None = None) -> tuple[ClusterBinding, str]:
        binding, pin = softhsm_token(label)
        profile = replace(binding.profile, module_path=private_module)
        return replace(binding, profile=profile), pin

    return make


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


def _audit(env: KmsEnv) -> consistency.Report:
    """Label audit of the env's store (injection off). The HSM side is read by pkcs11-tool, a
    separate process with its own PKCS#11 stack (the backend under test may be the one at fault);
    our backend must list exactly the same labels, duplicates included."""
    svc, store_id = env.svc, env.store_id
    assert store_id is not None
    witness = consistency.labels_via_pkcs11_tool(None, env.token_label, env.password)
    backend = svc.ctx.connections.peek(store_id)
    assert backend is not None
    ours = consistency.labels_of(backend)
    assert Counter(ours) == Counter(witness), "our backend and pkcs11-tool disagree"
    records = svc.ctx.meta.keys_in_store(store_id)
    return consistency.check(witness, records, svc.ctx.meta.deleted_keys(store_id))


def _reconnect(svc: KmsService, store_id: str) -> None:
    """A fresh login, so the session pool is built through whatever library is installed now."""
    svc.keystores.disconnect(ADMIN, store_id)
    svc.keystores.connect(ADMIN, store_id)
    store = svc.keystores.describe(ADMIN, store_id).items[0]
    assert store.connection_state.value == "CONNECTED", store


def test_pkcs11_faults_are_retried_or_surface_as_retryable_errors(
    kms_env: KmsEnv, softhsm_env: SoftHsmEnv, caplog: pytest.LogCaptureFixture
) -> None:
    svc, store_id = kms_env.svc, kms_env.store_id
    assert store_id is not None
    injector = Injector(SEED, 0.08, PKCS11_FAULTS)
    module = kms_env.settings.clusters[kms_env.cluster_id].profile.module_path
    assert module != softhsm_env.profile.module_path
    shared = load_library(softhsm_env.profile.module_path)
    shared_generation = shared.generation
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
        report = _audit(kms_env)
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
    # ...and only this file's private copy of it: other tests' backends keep their sessions.
    assert shared.generation == shared_generation, "faults re-initialised the shared library"
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
        report = _audit(kms_env)
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
    report = _audit(kms_env)
    report.assert_clean("after backend faults")
    assert report.live == len(mix.keys) - len(doomed)


def test_the_audit_witness_sees_a_duplicate_our_backend_hides(
    kms_env: KmsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label audit must not depend on the backend it audits: a second object carrying a live
    key's ARN (made by pkcs11-tool, as an operator would) is a duplicate even when our backend's
    enumeration folds it away (a fault in the code under test)."""
    svc, store_id = kms_env.svc, kms_env.store_id
    assert store_id is not None
    mix = Mix(svc, store_id, SEED)
    mix.create()
    mix.create()
    [arn, other] = mix.keys
    _audit(kms_env).assert_clean("before the duplicate")
    pkcs11_tool.run(
        kms_env.token_label, kms_env.password,
        "--keygen", "--key-type", "AES:32", "--label", arn, "--sensitive",
    )  # fmt: skip
    witness = pkcs11_tool.secret_key_objects(kms_env.token_label, kms_env.password)
    assert sorted(str(o.label) for o in witness) == sorted([arn, arn, other])
    with pytest.raises(AssertionError, match="duplicate labels"):
        pkcs11_tool.secret_keys(kms_env.token_label, kms_env.password)

    # Our backend, correct: both views see it, the audit reports it.
    report = consistency.check(
        consistency.labels_via_pkcs11_tool(None, kms_env.token_label, kms_env.password),
        svc.ctx.meta.keys_in_store(store_id),
        svc.ctx.meta.deleted_keys(store_id),
    )
    assert report.problems == [f"duplicate label x2: {arn}"]
    with pytest.raises(AssertionError, match="pkcs11-tool: LIVE keys by object count"):
        checks.assert_consistent(kms_env)

    # Our backend, broken: it lists each label once. The witness still sees two objects.
    backend = svc.ctx.connections.peek(store_id)
    assert backend is not None
    real_list_keys = backend.list_keys

    def folded() -> Iterator[HsmKeyInfo]:
        return iter({info.label: info for info in real_list_keys()}.values())

    monkeypatch.setattr(backend, "list_keys", folded)
    assert Counter(consistency.labels_of(backend))[arn] == 1
    with pytest.raises(AssertionError, match="our backend and pkcs11-tool disagree"):
        _audit(kms_env)
    with pytest.raises(AssertionError, match="pkcs11-tool: LIVE keys by object count"):
        checks.assert_consistent(kms_env)
