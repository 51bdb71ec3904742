"""Fixtures for the HTTP edge: a real uvicorn server on loopback running the KMS ASGI app with a
stand-in operation table, a temp credentials file, and real boto3 KMS clients pointed at it."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from hsmbridge.errors import (
    DependencyTimeoutException,
    KeyUnavailableException,
    NotFoundException,
)
from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.request import RequestContext
from hsmbridge.trail.calls import ApiEvent

REGION = "us-east-1"
ACCESS_KEY = "AKIAHSMBRIDGETEST001"
SECRET_KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ"
PRINCIPAL_ARN = "arn:aws:iam::111122223333:user/alice"
MAX_REQUEST_BYTES = 4096
LEAK_SENTINEL = "TOPSECRET-TRACEBACK-DETAIL"
HANDLER_DELAY_S = 0.05  # GetKeyRotationStatus's stand-in sleeps this long


@dataclass
class Stand:
    """The stand-in service: call counts per operation, events seen, and a clock skew knob."""

    calls: dict[str, int] = field(default_factory=dict)
    events: list[ApiEvent] = field(default_factory=list)
    skew: timedelta = timedelta(0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, op: str) -> None:
        with self.lock:
            self.calls[op] = self.calls.get(op, 0) + 1


def _operations(stand: Stand) -> dict[str, Any]:
    def generate_random(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("GenerateRandom")
        return {"Plaintext": os.urandom(params.get("NumberOfBytes", 32))}

    def list_keys(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("ListKeys")
        return {"Keys": [], "Truncated": False}

    def describe_key(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("DescribeKey")
        raise NotFoundException(f"Key '{params['KeyId']}' does not exist")

    def encrypt(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("Encrypt")
        raise RuntimeError(f"driver exploded: {LEAK_SENTINEL}")

    def decrypt(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("Decrypt")
        raise DependencyTimeoutException("The HSM did not answer in time.")

    def get_key_policy(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        stand.count("GetKeyPolicy")
        raise KeyUnavailableException("The key is not yet available on enough HSMs.")

    def get_key_rotation_status(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        # Takes a known time, so an event's duration can be checked against it.
        stand.count("GetKeyRotationStatus")
        time.sleep(HANDLER_DELAY_S)
        return {"KeyRotationEnabled": False}

    def get_public_key(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        # Echoes who called, so tests can see the authenticated principal reach the handler.
        return {"KeyId": ctx.principal_arn or "anonymous"}

    return {
        "GenerateRandom": generate_random,
        "ListKeys": list_keys,
        "DescribeKey": describe_key,
        "Encrypt": encrypt,
        "Decrypt": decrypt,
        "GetKeyPolicy": get_key_policy,
        "GetPublicKey": get_public_key,
        "GetKeyRotationStatus": get_key_rotation_status,
    }


def write_credentials(path: Path) -> Path:
    path.write_text(
        f"[alice]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"principal_arn = {PRINCIPAL_ARN}\n"
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def stand() -> Stand:
    return Stand()


@pytest.fixture(scope="session")
def server(stand: Stand, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    creds = write_credentials(tmp_path_factory.mktemp("api") / "credentials")
    verifier = SigV4Verifier(
        load_principals(creds), REGION, clock=lambda: datetime.now(UTC) + stand.skew
    )
    app = create_asgi_app(
        operations=_operations(stand),
        verifier=verifier,
        region=REGION,
        max_request_bytes=MAX_REQUEST_BYTES,
        on_event=stand.events.append,
    )
    with ThreadedServer(app) as srv:
        yield srv


def make_client(
    server: ThreadedServer,
    *,
    region: str = REGION,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    attempts: int = 1,
    validate: bool = True,
) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=server.endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            parameter_validation=validate,
        ),
    )


@pytest.fixture
def kms(server: ThreadedServer) -> Any:
    return make_client(server)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


_POOL = urllib3.PoolManager()


def signed(
    url: str,
    target: str | None,
    body: bytes,
    *,
    content_type: str = "application/x-amz-json-1.1",
    region: str = REGION,
    service: str = "kms",
) -> AWSRequest:
    headers = {"Content-Type": content_type}
    if target is not None:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=url + "/", data=body, headers=headers)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), service, region).add_auth(request)
    return request


def send(request: AWSRequest, body: bytes | None = None) -> RawResponse:
    """Send a (possibly tampered) request as is; `body` replaces the signed body."""
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    payload = request.body if body is None else body
    resp = _POOL.request(
        "POST", request.url, body=payload, headers=headers, retries=False, timeout=10
    )
    return RawResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.data)


def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
