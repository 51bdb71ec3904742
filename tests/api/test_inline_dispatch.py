"""Cryptographic requests on the server's event loop (`hsmbridge.nowait`), on a real server over a
real SoftHSM2 token with real boto3 clients.

- Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext) and GenerateRandom run inline
  once the key is in a session's cache, and give the same answers as on a thread;
- `[service] inline_hsm_calls = false` puts every one of them back on a worker thread;
- a request that would wait (here: for the PKCS#11 library lock another thread holds) is run
  again on a worker thread instead, and meanwhile the event loop serves other requests;
- a request run twice that way is charged to the request quotas once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from hsmbridge.backend.sessions import load_library
from tests.cloudhsm_shim import softhsm2_only
from tests.held_lock import HeldLock
from tests.live import Live, served_with_store

pytestmark = [pytest.mark.softhsm, softhsm2_only]

# Long enough that a loop blocked behind the lock could not answer within HELD_S / 2, even on a
# busy machine.
HELD_S = 3.0


def _dispatch(live: Live) -> dict[str, float]:
    status, body, _ = live.get("/metrics")
    assert status == 200
    found = re.findall(rb'^hsmbridge_request_dispatch_total\{ran="(\w+)"\} (\S+)$', body, re.M)
    return {ran.decode(): float(value) for ran, value in found}


def _append(live_env: Any, section: str, line: str) -> None:
    path = live_env.config_path
    text = path.read_text()
    if f"[{section}]\n" in text:
        path.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))
    else:
        path.write_text(text + f"\n[{section}]\n{line}\n")


@pytest.fixture
def live(make_kms_env: Any) -> Iterator[Live]:
    env = make_kms_env(store=False)
    with served_with_store(env) as served:
        yield served


def _every_crypto_operation(live: Live, key_id: str) -> None:
    kms = live.kms
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"inline", EncryptionContext={"a": "b"})
    opened = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"a": "b"})
    assert opened["Plaintext"] == b"inline"
    moved = kms.re_encrypt(
        CiphertextBlob=blob["CiphertextBlob"],
        SourceEncryptionContext={"a": "b"},
        DestinationKeyId=key_id,
    )
    assert kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == b"inline"
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert len(data_key["Plaintext"]) == 32
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        == (data_key["Plaintext"])
    )
    assert "Plaintext" not in kms.generate_data_key_without_plaintext(
        KeyId=key_id, NumberOfBytes=16
    )
    assert len(kms.generate_random(NumberOfBytes=24, CustomKeyStoreId=live.store_id)["Plaintext"])
    tampered = blob["CiphertextBlob"][:-1] + bytes([blob["CiphertextBlob"][-1] ^ 1])
    with pytest.raises(ClientError) as bad:
        kms.decrypt(CiphertextBlob=tampered, EncryptionContext={"a": "b"})
    assert bad.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_cryptographic_requests_run_on_the_event_loop(live: Live) -> None:
    key_id = live.create_key()["KeyId"]
    live.kms.encrypt(KeyId=key_id, Plaintext=b"warm the session's key cache")
    before = _dispatch(live)
    for _ in range(3):
        _every_crypto_operation(live, key_id)
    after = _dispatch(live)
    served = {ran: after[ran] - before.get(ran, 0.0) for ran in after}
    # 3 rounds of 9 requests (the failed Decrypt included). Some reruns are allowed: the IAM
    # directory and the cluster inventory are re-read on a thread when their caches expire
    # (every second or two, more often than not on a busy machine).
    assert served["inline"] >= 18, served
    assert served["inline"] + served["rerun"] == 27, served
    assert served["thread"] == 0, served


def test_switched_off_every_request_runs_on_a_thread(make_kms_env: Any) -> None:
    env = make_kms_env(store=False)
    _append(env, "service", "inline_hsm_calls = false")
    with served_with_store(env) as live:
        key_id = live.create_key()["KeyId"]
        before = _dispatch(live)
        _every_crypto_operation(live, key_id)
        after = _dispatch(live)
    served = {ran: after[ran] - before.get(ran, 0.0) for ran in after}
    assert served == {"inline": 0, "rerun": 0, "thread": 9}, served


def _held_library(live: Live) -> HeldLock:
    """The PKCS#11 library lock held from another thread, as a call stuck in the HSM would."""
    profile = live.env.settings.binding(live.env.cluster_id).profile
    return HeldLock(load_library(profile.module_path).lock, HELD_S)


def test_a_request_that_would_wait_runs_on_a_thread_and_the_loop_serves_meanwhile(
    live: Live,
) -> None:
    key_id = live.create_key()["KeyId"]
    live.kms.encrypt(KeyId=key_id, Plaintext=b"warm")
    before = _dispatch(live)
    with _held_library(live), ThreadPoolExecutor(1) as pool:
        held_at = time.monotonic()
        pending = pool.submit(live.client().encrypt, KeyId=key_id, Plaintext=b"late")
        time.sleep(0.2)
        assert not pending.done()  # it waits for the library, on a worker thread
        # The event loop is free: a request served inline without the HSM answers at once.
        begin = time.monotonic()
        assert len(live.kms.generate_random(NumberOfBytes=8)["Plaintext"]) == 8
        assert time.monotonic() - begin < HELD_S / 2
        assert time.monotonic() - held_at < HELD_S
        blob = pending.result(timeout=30)["CiphertextBlob"]
    assert live.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"late"
    after = _dispatch(live)
    assert after["rerun"] - before.get("rerun", 0.0) >= 1, (before, after)


def test_a_rerun_request_is_charged_to_the_quotas_once(make_kms_env: Any) -> None:
    env = make_kms_env(store=False)
    # One token a store, refilled every 20 s: a second charge in this test would be throttled.
    _append(env, "quotas", "enabled = true\ncustom_key_store_requests_per_s = 0.05")
    with served_with_store(env) as live:
        key_id = live.create_key()["KeyId"]
        before = _dispatch(live)
        with ThreadPoolExecutor(1) as pool:
            with _held_library(live):
                pending = pool.submit(live.client().encrypt, KeyId=key_id, Plaintext=b"once")
                time.sleep(0.2)
                assert not pending.done()
            assert pending.result(timeout=30)["KeyId"]
        assert _dispatch(live)["rerun"] - before.get("rerun", 0.0) == 1
        with pytest.raises(ClientError) as throttled:  # the quotas are on: the next one is over
            live.kms.encrypt(KeyId=key_id, Plaintext=b"twice")
        assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
