"""The real hsmbridge server for end-to-end tests, and what the tests observe of it.

`E2e` bundles one running server (built by the production composition root `create_app` over a
real SoftHSM token), its boto3 KMS client and the custom key store created and connected through
that client. `Observations` is the session-wide record the contract test checks at the end: every
raw response body boto3 received and every (operation, error code, status) the server answered.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hsmbridge.config import load_settings
from hsmbridge.http.compose import Runtime, create_app
from hsmbridge.http.server import ThreadedServer
from tests.harness import ACCESS_KEY, REGION, SECRET_KEY, KmsEnv, MemorySink

CONNECT_TIMEOUT_S = 15.0


@dataclass
class Observations:
    """Everything the e2e tests saw on the wire, for the contract test."""

    # (operation, HTTP status, raw body) of every response a recording boto3 client received.
    responses: list[tuple[str, int, bytes]] = field(default_factory=list)
    # Server-side audit sinks: they also see requests from the aws CLI and from raw senders.
    sinks: list[MemorySink] = field(default_factory=list)
    # (operation, error code, status) of raw-request answers (fuzzing), recorded by the sender.
    raw_errors: set[tuple[str, str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, http_response: Any, model: Any, **_: Any) -> None:
        """botocore `after-call` handler: keep the raw body before boto3 parses it."""
        with self.lock:
            self.responses.append((model.name, http_response.status_code, http_response.content))

    def error_pairs(self) -> set[tuple[str, str, int]]:
        """(operation, error code, status) from every recording client and every server."""
        seen = set(self.raw_errors)
        with self.lock:
            for op, status, body in self.responses:
                if status != 200:
                    seen.add((op, json.loads(body)["__type"], status))
        for sink in self.sinks:
            for event in list(sink.events):
                status = event.additional.get("status")
                if event.error_code and isinstance(status, int):
                    seen.add((event.event_name, event.error_code, status))
        return seen


@dataclass
class E2e:
    env: KmsEnv
    runtime: Runtime
    server: ThreadedServer
    kms: Any  # boto3 KMS client with one attempt per call (errors are never retried away)
    store_id: str = ""

    @property
    def url(self) -> str:
        return self.server.endpoint_url

    def create_key(self, description: str = "e2e") -> dict[str, Any]:
        return self.kms.create_key(
            Origin="AWS_CLOUDHSM", CustomKeyStoreId=self.store_id, Description=description
        )["KeyMetadata"]

    def store_state(self) -> str:
        stores = self.kms.describe_custom_key_stores(CustomKeyStoreId=self.store_id)
        return stores["CustomKeyStores"][0]["ConnectionState"]

    def connect(self) -> None:
        """ConnectCustomKeyStore returns once connecting has started; poll until CONNECTED."""
        self.kms.connect_custom_key_store(CustomKeyStoreId=self.store_id)
        wait_until(lambda: self.store_state() == "CONNECTED", CONNECT_TIMEOUT_S)

    def disconnect(self) -> None:
        self.kms.disconnect_custom_key_store(CustomKeyStoreId=self.store_id)

    def close(self) -> None:
        self.server.stop()
        self.runtime.close()


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def kms_client(url: str, observations: Observations | None = None, *, validate: bool = True) -> Any:
    """A boto3 KMS client; `validate=False` lets out-of-range values reach the server."""
    client = boto3.client(
        "kms",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        # One attempt: a 5xx must show up as the error it is, not be retried into a success.
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1}, parameter_validation=validate
        ),
    )
    if observations is not None:
        client.meta.events.register("after-call.kms", observations.hook)
    return client


def start_e2e(env: KmsEnv, observations: Observations, store_name: str = "E2eStore") -> E2e:
    """Start the production app over `env` and create + connect a store through boto3."""
    # The harness's own service would hold the same metadata DB and token; only one may serve.
    env.close()
    sink = MemorySink()
    observations.sinks.append(sink)
    runtime = create_app(
        load_settings(env.config_path), clock=env.clock, audit=sink, sweep_interval_s=None
    )
    server = ThreadedServer(runtime.app).start()
    e2e = E2e(env, runtime, server, kms_client(server.endpoint_url, observations))
    try:
        e2e.store_id = e2e.kms.create_custom_key_store(
            CustomKeyStoreName=store_name,
            CloudHsmClusterId=env.cluster_id,
            TrustAnchorCertificate=env.pki.ca_cert_pem,
            KeyStorePassword=env.password,
        )["CustomKeyStoreId"]
        e2e.connect()
    except BaseException:
        e2e.close()
        raise
    return e2e


def error_of(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def expect_error(code: str, call: Callable[[], Any], status: int = 400) -> str:
    """Run `call`, require the KMS error `code` with `status`; returns the message."""
    with pytest.raises(ClientError) as info:
        call()
    assert error_of(info) == (code, status), info.value.response["Error"]
    return str(info.value.response["Error"]["Message"])


_POOL = urllib3.PoolManager(maxsize=4)


@dataclass
class RawAnswer:
    status: int
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def send_raw(url: str, operation: str, body: bytes) -> RawAnswer:
    """A correctly signed request whose JSON body is sent as is (invalid types included)."""
    request = AWSRequest(
        method="POST",
        url=url + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "kms", REGION).add_auth(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    resp = _POOL.request("POST", request.url, body=body, headers=headers, retries=False, timeout=30)
    return RawAnswer(resp.status, resp.data)
