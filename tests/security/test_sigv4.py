"""SigV4 hardening with signatures made by botocore, through the real server: every tampered,
replayed, misscoped or unknown-key request is rejected before any handler runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from tests.api.conftest import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    make_client,
    send,
    signed,
    write_credentials,
)


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def calls() -> list[str]:
    return []


@pytest.fixture(scope="module")
def server(tmp_path_factory, clock, calls):
    def handler(name: str) -> Any:
        def run(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
            calls.append(name)
            return {"KeyId": "k"} if name == "ScheduleKeyDeletion" else {"Keys": []}

        return run

    creds = write_credentials(tmp_path_factory.mktemp("sigv4") / "credentials")
    app = create_asgi_app(
        operations={name: handler(name) for name in ("ListKeys", "ScheduleKeyDeletion")},
        verifier=SigV4Verifier(load_principals(creds), REGION, clock=clock),
        region=REGION,
        max_request_bytes=4096,
    )
    with ThreadedServer(app) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(clock, calls):
    clock.offset = timedelta(0)
    calls.clear()


def _error(resp) -> tuple[str, str]:
    assert resp.status == 400, resp.body
    doc = json.loads(resp.body)
    return doc["__type"], doc["message"]


def test_botocore_signs_the_target_and_content_type(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    signed_headers = request.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0]
    assert {"content-type", "host", "x-amz-date", "x-amz-target"} <= set(signed_headers.split(";"))


def test_replay_inside_the_window_is_accepted_outside_rejected(server, clock, calls):
    # SigV4 has no nonce: AWS accepts a replay within 5 minutes, and so do we (documented).
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    assert send(request).status == 200
    clock.offset = timedelta(minutes=4)
    assert send(request).status == 200
    clock.offset = timedelta(minutes=6)
    code, message = _error(send(request))
    assert code == "InvalidSignatureException"
    assert message.startswith("Signature expired: ")
    assert calls == ["ListKeys", "ListKeys"]


def test_request_signed_in_the_future_is_rejected(server, clock, calls):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    clock.offset = -timedelta(minutes=6)
    code, message = _error(send(request))
    assert (code, message.split(":")[0]) == (
        "InvalidSignatureException",
        "Signature not yet current",
    )
    assert calls == []


def test_body_changed_after_signing_keeps_length(server, calls):
    request = signed(server.endpoint_url, "TrentService.ScheduleKeyDeletion", b'{"KeyId":"aaaa"}')
    code, message = _error(send(request, body=b'{"KeyId":"bbbb"}'))
    assert code == "InvalidSignatureException"
    assert message.startswith("The request signature we calculated does not match")
    assert calls == []


def test_target_swapped_after_signing(server, calls):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b'{"KeyId":"k"}')
    request.headers.replace_header("X-Amz-Target", "TrentService.ScheduleKeyDeletion")
    code, _ = _error(send(request))
    assert code == "InvalidSignatureException"
    assert calls == []


def test_unsigned_target_is_rejected(server, calls):
    """A signer that left X-Amz-Target out of SignedHeaders would let the operation be swapped."""
    body = b'{"KeyId":"k"}'
    request = AWSRequest(
        method="POST",
        url=server.endpoint_url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1"},
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "kms", REGION).add_auth(request)
    request.headers["X-Amz-Target"] = "TrentService.ScheduleKeyDeletion"  # added after signing
    code, message = _error(send(request))
    assert code == "InvalidSignatureException"
    assert message == "'x-amz-target' must be a 'SignedHeader' in the AWS Authorization."
    assert calls == []


def test_other_region(server, calls):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}", region="eu-west-1")
    code, message = _error(send(request))
    assert code == "InvalidSignatureException"
    assert message.startswith("Credential should be scoped to a valid region, not 'eu-west-1'")
    assert calls == []


def test_other_service(server, calls):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}", service="cloudhsm")
    code, message = _error(send(request))
    assert (code, message) == (
        "InvalidSignatureException",
        "Credential should be scoped to correct service: 'kms'. ",
    )
    assert calls == []


@pytest.mark.parametrize(
    ("access_key", "secret_key", "code"),
    [
        ("AKIAUNKNOWNKEY000000", SECRET_KEY, "UnrecognizedClientException"),
        (ACCESS_KEY, "wrong-secret", "InvalidSignatureException"),
    ],
)
def test_unknown_key_and_wrong_secret_through_boto3(server, calls, access_key, secret_key, code):
    kms = make_client(server, access_key=access_key, secret_key=secret_key)
    with pytest.raises(ClientError) as info:
        kms.list_keys()
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert calls == []
