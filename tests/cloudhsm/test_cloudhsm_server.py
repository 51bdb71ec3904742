"""`hsmbridge init --hsm cloudhsm-shim` then `hsmbridge serve`, with CloudHSM's failures injected.

The environment `init` writes reaches its cluster through the CloudHSM stand-in with the
`cloudhsm` profile, as a staging host reaches a real cluster: one slot, "kmsuser:password",
HSM-written IVs. Unmodified boto3 clients then drive it while the stand-in's faults file says the
HSM throttles, is slow, cannot make a key available on two HSMs, or is gone, and the server must
answer in KMS's terms, lose nothing and recover by itself. Two worker processes serve it, so a key
one worker made is used by the other.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = pytest.mark.softhsm

RETRIED_STATUSES = {500, 502, 503, 504}


def _faults(env: InitEnv, text: str) -> None:
    path = env.root / "cloudhsm-shim.faults"
    path.write_text(text)
    now = time.time_ns()
    # The stand-in re-reads the file when its modification time changes: make sure it does.
    os.utime(path, ns=(now, now + 1_000_000))


def _eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (ClientError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("cloudhsm-shim-server")
    env = init_env(root / "env", hsm="cloudhsm-shim")
    srv = ServerProcess.serve(env, root / "server.log", "--workers", "2").wait_ready()
    yield env, srv
    _faults(env, "")
    assert srv.stop() == 0, srv.log()
    assert "Traceback" not in srv.log()


def test_init_writes_a_cloudhsm_profile_cluster_behind_the_stand_in(served) -> None:
    env, _ = served
    doc = tomllib.loads(env.config.read_text())
    (cluster,) = doc["clusters"]
    assert cluster["profile"] == "cloudhsm"
    assert cluster["module_path"].endswith("libcloudhsm-shim.so")
    assert "token_label" not in cluster  # one slot per cluster, as CloudHSM shows it
    assert doc["hsm"]["env"]["HSMBRIDGE_SHIM_CONF"] == "cloudhsm-shim.conf"


def test_keys_work_across_workers_and_under_throttling_and_latency(served) -> None:
    env, srv = served
    kms = env.client(srv.url, attempts=3)
    keys = [
        kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)["KeyMetadata"]["Arn"]
        for _ in range(6)
    ]
    blobs = {}
    for round_ in range(3):
        if round_ == 1:
            _faults(env, "throttle_rate = 0.3\n")  # CloudHSM's "HSM busy": retried inside
        if round_ == 2:
            _faults(env, "latency_ms = 40\n")
        for arn in keys:  # two workers behind one port: each key meets both
            blob = kms.encrypt(KeyId=arn, Plaintext=b"payload", EncryptionContext={"r": "1"})
            blobs[arn] = blob["CiphertextBlob"]
            plain = kms.decrypt(CiphertextBlob=blobs[arn], EncryptionContext={"r": "1"})
            assert plain["Plaintext"] == b"payload"
            data_key = kms.generate_data_key(KeyId=arn, KeySpec="AES_256")
            assert len(data_key["Plaintext"]) == 32
    _faults(env, "")
    tampered = bytearray(blobs[keys[0]])
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as info:
        kms.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext={"r": "1"})
    assert info.value.response["Error"]["Code"] == "InvalidCiphertextException"


def test_a_key_the_cluster_cannot_make_available_leaves_nothing_behind(served) -> None:
    env, srv = served
    kms = env.client(srv.url)
    before = {k["KeyId"] for k in kms.list_keys()["Keys"]}
    _faults(env, "key_availability_fails = 1\n")
    try:
        with pytest.raises(ClientError) as info:
            kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
        answer = info.value.response
        assert answer["ResponseMetadata"]["HTTPStatusCode"] in RETRIED_STATUSES, answer
    finally:
        _faults(env, "")
    _eventually(lambda: _no_new_keys(kms, before))
    assert kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)["KeyMetadata"]


def _no_new_keys(kms: Any, before: set[str]) -> None:
    after = {k["KeyId"]: k for k in kms.list_keys()["Keys"]}
    for key_id in set(after) - before:
        state = kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]
        raise AssertionError(f"CreateKey left key {key_id} behind ({state})")


def test_all_hsms_gone_then_back(served) -> None:
    env, srv = served
    kms = env.client(srv.url)
    arn = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)["KeyMetadata"]["Arn"]
    blob = kms.encrypt(KeyId=arn, Plaintext=b"before")["CiphertextBlob"]
    _faults(env, "down = 1\n")
    try:
        with pytest.raises(ClientError) as info:
            kms.decrypt(CiphertextBlob=blob)
        answer = info.value.response
        assert answer["ResponseMetadata"]["HTTPStatusCode"] in RETRIED_STATUSES, answer
    finally:
        _faults(env, "")
    assert _eventually(lambda: kms.decrypt(CiphertextBlob=blob)["Plaintext"]) == b"before"
