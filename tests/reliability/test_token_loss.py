"""The HSM really going away: the SoftHSM2 token directory is moved out from under a running
server, then moved back.

While it is gone every key operation must fail with a retryable error (KeyUnavailableException
or DependencyTimeoutException, 5xx, which SDKs retry) rather than "key material missing" (a 400
nobody retries) or a crash, and /health must report the store UNAVAILABLE. Once it is back the
server must recover by itself, with no restart: re-initialise the library (SoftHSM only reads its
token directory at C_Initialize), log in again, rebuild the handle cache, and serve Encrypt and
Decrypt of old and new ciphertexts.
What a CreateKey left half-done during the outage must be cleaned up without a restart as well.

The server is a subprocess over a `hsmbridge init` environment (its own token directory); the
launcher only shortens the health cache and the sweeper interval. ~8 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = pytest.mark.softhsm

RECOVERY_TIMEOUT_S = 20.0
RETRIED_STATUSES = {500, 502, 503, 504}
RETRYABLE = {"KeyUnavailableException", "DependencyTimeoutException"}


def _eventually(check: Callable[[], Any], what: str, timeout: float = RECOVERY_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except (ClientError, AssertionError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s: {last}")


def _store_status(srv: ServerProcess, env: InitEnv) -> tuple[int, str]:
    code, doc = srv.health()
    return code, doc["stores"][env.store_id]["status"]


def _fails_retryably(call: Callable[[], Any]) -> str:
    with pytest.raises(ClientError) as info:
        call()
    err = info.value.response
    # boto3 retries 500/502/503/504 (STYLE practice 2); 4xx would tell clients to give up.
    assert err["ResponseMetadata"]["HTTPStatusCode"] in RETRIED_STATUSES, err
    return str(err["Error"]["Code"])


def test_token_directory_vanishes_and_returns(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = ServerProcess.launcher(
        env, tmp_path / "server.log", "--health-ttl", "0", "--sweep-interval", "0.5"
    ).wait_ready()
    try:
        kms = env.client(srv.url)
        arn = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)["KeyMetadata"][
            "Arn"
        ]
        before = kms.encrypt(KeyId=arn, Plaintext=b"written before the outage")["CiphertextBlob"]
        assert _store_status(srv, env) == (200, "ACTIVE")

        (token_dir,) = env.token_dirs()
        parked = tmp_path / "parked"
        parked.mkdir()
        token_dir.rename(parked / token_dir.name)

        codes = {
            _fails_retryably(lambda: kms.encrypt(KeyId=arn, Plaintext=b"x")),
            _fails_retryably(lambda: kms.decrypt(CiphertextBlob=before)),
            _fails_retryably(lambda: kms.generate_data_key(KeyId=arn, NumberOfBytes=32)),
            _fails_retryably(
                lambda: kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
            ),
        }
        assert codes <= RETRYABLE, codes
        assert _store_status(srv, env) == (503, "UNAVAILABLE")
        # Still failing the same way a little later: no crash, no state flip to "missing".
        time.sleep(1.5)
        assert _fails_retryably(lambda: kms.decrypt(CiphertextBlob=before)) in RETRYABLE

        (parked / token_dir.name).rename(token_dir)
        back = _eventually(
            lambda: kms.decrypt(CiphertextBlob=before)["Plaintext"], "Decrypt after the return"
        )
        assert back == b"written before the outage"
        after = kms.encrypt(KeyId=arn, Plaintext=b"after")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=after)["Plaintext"] == b"after"
        fresh = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
        kms.encrypt(KeyId=fresh["KeyMetadata"]["KeyId"], Plaintext=b"new key works")

        def active() -> None:
            assert _store_status(srv, env) == (200, "ACTIVE")

        _eventually(active, "/health ACTIVE again")
        # The CreateKey that failed during the outage is rolled back by the sweeper.
        _eventually(lambda: env.check().assert_clean("after the outage"), "a clean label audit")
        assert srv.proc.poll() is None
        assert "Traceback" not in srv.log(), srv.log()
    finally:
        srv.kill()
