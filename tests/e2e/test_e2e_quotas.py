"""`[quotas]` end to end: the production app over SoftHSM, real boto3, real retry logic.

A burst of Encrypts over a small custom key store quota gets ThrottlingException (HTTP 400) on a
client that does not retry, and succeeds in full on a client in botocore's standard retry mode,
which retries ThrottlingException by its code with backoff.

The rate is 20/s rather than a handful: standard mode backs off a random 0-1 s, then 0-2 s, and
three attempts must span the wait for one token (1/rate) almost surely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.e2e.e2e_support import E2e, Observations, start_e2e
from tests.harness import ACCESS_KEY, REGION, SECRET_KEY, KmsEnv

RATE = 20
BURST = 3 * RATE


@pytest.fixture
def throttled(make_kms_env: Callable[..., KmsEnv], observations: Observations) -> Iterator[E2e]:
    """A server of its own whose store quota is RATE requests per second."""
    env = make_kms_env(store=False)
    with env.config_path.open("a") as fh:
        fh.write(f"\n[quotas]\nenabled = true\ncustom_key_store_requests_per_s = {RATE}\n")
    e2e = start_e2e(env, observations)
    yield e2e
    e2e.close()


def _client(url: str, retries: dict[str, Any]) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries=retries),  # type: ignore[arg-type]
    )


def test_a_burst_is_throttled_and_standard_retries_get_through(throttled: E2e) -> None:
    key_id = throttled.create_key()["KeyId"]
    # One attempt per call: a throttled request surfaces as the ClientError it is.
    once = _client(throttled.url, {"mode": "standard", "total_max_attempts": 1})
    refused = []
    for _ in range(BURST):
        try:
            once.encrypt(KeyId=key_id, Plaintext=b"burst")
        except ClientError as exc:
            refused.append(exc.response)
    assert refused, "a burst of 3 seconds' worth was never throttled"
    assert len(refused) < BURST
    for response in refused:
        assert response["Error"]["Code"] == "ThrottlingException"
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert throttled.store_id in response["Error"]["Message"]

    # The same burst on the default standard retry mode (3 attempts) all gets through.
    patient = _client(throttled.url, {"mode": "standard"})
    started = time.monotonic()
    retried = 0
    for _ in range(BURST):
        response = patient.encrypt(KeyId=key_id, Plaintext=b"burst")
        assert response["KeyId"].endswith(key_id)
        retried += response["ResponseMetadata"]["RetryAttempts"]
    assert retried > 0  # botocore did retry ThrottlingException, and the retries succeeded
    assert time.monotonic() - started < 15.0
