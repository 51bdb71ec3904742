"""A stuck HSM stalls nothing but its own work (hardening finding F7), on a real server over a real
SoftHSM2 token with real boto3 clients.

The HSM is made to hang the way a stuck PKCS#11 call hangs it: a thread holds the module's call
lock (every SoftHSM2 call is serialised under it) for several seconds. While it does:
- metadata-only operations (ListKeys, DescribeKey, ListAliases) answer at once: they run in their
  own thread pool and never wait for an HSM;
- `/health` answers within 2 s, 503, with the store UNAVAILABLE (its probe is stuck, or refused
  by the store's full bulkhead);
- Encrypts fail with the retryable DependencyTimeoutException at about the request deadline, and
  none of them is started on the HSM once the lock is free (their deadline had passed);
- afterwards the store serves again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from hsmbridge.backend.sessions import load_library
from tests.live import Live, served_with_store

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

REQUEST_TIMEOUT_S = 2.0
STUCK_S = 7.0
# More than the HSM worker threads (32): without per-store bulkheads they would all be stuck.
ENCRYPTS = 40


def _with_request_timeout(config_path: Any, seconds: float) -> None:
    text = config_path.read_text()
    assert "request_timeout_s" not in text
    config_path.write_text(
        text.replace("[service]\n", f"[service]\nrequest_timeout_s = {seconds}\n", 1)
    )


def _pkcs11_backend(live: Live) -> Any:
    backend = live.runtime.service.ctx.connections.peek(live.store_id)
    while hasattr(backend, "inner"):  # timing wrapper, then the store's bulkhead
        backend = backend.inner
    return backend


def _count_started_hsm_work(backend: Any) -> list[float]:
    """Instrument the backend: the time of every operation that actually ran in a session."""
    started: list[float] = []
    run = backend._run

    def spy(op: Any, **kwargs: Any) -> Any:
        def counted(worker: Any) -> Any:
            started.append(time.monotonic())
            return op(worker)

        return run(counted, **kwargs)

    backend._run = spy
    return started


@pytest.fixture
def slow_live(make_kms_env: Any) -> Any:
    env = make_kms_env(store=False)
    _with_request_timeout(env.config_path, REQUEST_TIMEOUT_S)
    with served_with_store(env) as live:
        yield live


def _timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_stuck_hsm_stalls_neither_metadata_nor_health_and_late_work_never_starts(
    slow_live: Live,
) -> None:
    live = slow_live
    key_id = live.create_key()["KeyId"]
    live.kms.create_alias(AliasName="alias/slow-hsm", TargetKeyId=key_id)
    assert live.kms.encrypt(KeyId=key_id, Plaintext=b"warm")["KeyId"]
    started = _count_started_hsm_work(_pkcs11_backend(live))
    library = load_library(live.env.settings.binding(live.env.cluster_id).profile.module_path)

    holding = threading.Event()
    release = threading.Event()

    def stuck_hsm() -> None:
        with library.lock:
            holding.set()
            release.wait(STUCK_S)

    holder = threading.Thread(target=stuck_hsm, daemon=True)
    holder.start()
    assert holding.wait(5)
    stuck_at = time.monotonic()

    def encrypt(_: int) -> tuple[str, float]:
        client = live.client()  # one attempt: the test counts what the server did
        begin = time.monotonic()
        try:
            client.encrypt(KeyId=key_id, Plaintext=b"late")
            return "ok", time.monotonic() - begin
        except ClientError as exc:
            return exc.response["Error"]["Code"], time.monotonic() - begin

    try:
        with ThreadPoolExecutor(ENCRYPTS) as pool:
            outcomes = pool.map(encrypt, range(ENCRYPTS))
            time.sleep(0.5)  # the Encrypts are waiting on the HSM now
            # Metadata-only operations never wait for the HSM.
            for call in (
                live.kms.list_keys,
                lambda: live.kms.describe_key(KeyId=key_id),
                lambda: live.kms.list_aliases(KeyId=key_id),
                live.kms.describe_custom_key_stores,
            ):
                assert _timed(call) < 1.0
            # /health answers within 2 s from its last probe, even though the probe is stuck.
            live.health_clock.advance(3600)  # past the cache TTL: a new probe starts
            begin = time.monotonic()
            status, doc = live.health()
            assert time.monotonic() - begin < 2.0
            assert status == 503
            store = doc["stores"][live.store_id]
            assert store["status"] == "UNAVAILABLE"
            # Either the probe waits on the HSM, or the store's bulkhead is full and refuses it.
            detail = store["detail"]
            assert "has not answered" in detail or "StoreSaturatedError" in detail, detail
            results = list(outcomes)
        # Every Encrypt got the retryable timeout near its deadline, none waited for the HSM.
        codes = {code for code, _ in results}
        assert codes <= {"DependencyTimeoutException", "KeyUnavailableException"}, results
        assert "DependencyTimeoutException" in codes
        assert max(elapsed for _, elapsed in results) < REQUEST_TIMEOUT_S + 2.0
    finally:
        release.set()
        holder.join(10)
    released_at = time.monotonic()
    assert released_at - stuck_at < STUCK_S + 1
    time.sleep(0.5)  # any queued work would start now that the HSM answers again
    # Their deadlines had passed: none of the refused Encrypts was started on the HSM. The only
    # HSM work since is the health probe's own ping, if it was still waiting for the lock.
    assert len(started) <= 1, started
    # And the store serves again.
    assert live.kms.encrypt(KeyId=key_id, Plaintext=b"again")["KeyId"]
    live.health_clock.advance(3600)
    deadline = time.monotonic() + 5
    while live.health()[0] != 200:
        assert time.monotonic() < deadline, live.health()
        live.health_clock.advance(3600)
        time.sleep(0.1)
