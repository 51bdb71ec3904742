"""What an unsigned request gets from the production app (`create_app` over a real SoftHSM store,
served by uvicorn): `GET /health` and `GET /metrics` answer; nothing else does.

Every KMS operation of the botocore model, sent unsigned to `POST /`, is refused (no handler
runs, nothing changes); so is every other method and path. The only unsigned answers with
content are the two operations endpoints.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from hsmbridge.protocol.validation import operation_names

pytestmark = pytest.mark.softhsm

HTTP = urllib3.PoolManager()
KMS_HEADERS = {"Content-Type": "application/x-amz-json-1.1"}
# Refusals of a request that is not signed (or not a KMS request at all), none of which runs a
# handler: the request never reaches an operation.
REFUSED = {
    "MissingAuthenticationTokenException",  # a KMS operation without a signature
    "UnknownOperationException",  # no such route, target or content type
}


def _unsigned(url: str, method: str, path: str, body: bytes = b"", **headers: str):
    return HTTP.request(
        method, url + path, body=body or None, headers=headers, retries=False, timeout=30
    )


def test_health_and_metrics_answer_unsigned(live) -> None:
    key = live.create_key()
    live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"counted")
    health = _unsigned(live.url, "GET", "/health")
    assert health.status == 200
    assert json.loads(health.data)["stores"][live.store_id]["status"] == "ACTIVE"
    metrics = _unsigned(live.url, "GET", "/metrics")
    assert metrics.status == 200
    names = {f.name for f in text_string_to_metric_families(metrics.data.decode())}
    assert "hsmbridge_requests" in names


def test_every_kms_operation_requires_a_signature(live) -> None:
    key = live.create_key()
    before = live.kms.list_keys()["Keys"]
    sealed = live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"kept")["CiphertextBlob"]
    valid = {  # well-formed parameters, so only the missing signature can stop them
        "CreateKey": {"Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": live.store_id},
        "ScheduleKeyDeletion": {"KeyId": key["KeyId"], "PendingWindowInDays": 7},
        "DisableKey": {"KeyId": key["KeyId"]},
        "Decrypt": {"CiphertextBlob": base64.b64encode(sealed).decode()},
        "DisconnectCustomKeyStore": {"CustomKeyStoreId": live.store_id},
        "ListKeys": {},
    }
    codes = {}
    for operation in sorted(operation_names()):
        body = json.dumps(valid.get(operation, {})).encode()
        target = {"X-Amz-Target": f"TrentService.{operation}"}
        resp = _unsigned(live.url, "POST", "/", body, **KMS_HEADERS, **target)
        assert resp.status == 400, (operation, resp.status, resp.data)
        codes[operation] = json.loads(resp.data)["__type"]
    # Every KMS operation, implemented or not, is refused for the missing signature itself:
    # the signature is checked before the operation is looked up in hsmbridge's table.
    assert set(codes.values()) == {"MissingAuthenticationTokenException"}, codes
    # Nothing ran: same keys, the key still enabled and usable, the store still connected.
    assert live.kms.list_keys()["Keys"] == before
    assert live.kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    assert live.kms.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"kept"
    stores = live.kms.describe_custom_key_stores(CustomKeyStoreId=live.store_id)
    assert stores["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
    # The refusals are audited as anonymous calls, up to the audit rate limit for them; the
    # rest are counted in a summary line, written at most once a second: on a busy machine the
    # requests span several seconds, so the last summary may still be due. Wait for it.
    deadline = time.monotonic() + 5.0
    while True:
        events = live.events()
        refused = [e for e in events if e["errorCode"] == "MissingAuthenticationTokenException"]
        suppressed = [e for e in events if e["eventName"] == "AuditEventsSuppressed"]
        counted = sum(e["additionalEventData"]["suppressed"] for e in suppressed)
        if len(refused) + counted >= len(codes) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {e["eventName"] for e in refused} <= set(codes)
    assert all(e["principalArn"] is None for e in refused)
    assert len(refused) + counted == len(codes)
    # Nothing of an unauthenticated body is recorded: it was never parsed.
    assert all(not e["requestParameters"] for e in refused), refused[:2]


def test_unauthenticated_bodies_are_neither_parsed_nor_logged(live) -> None:
    """F1: a flood of unsigned or wrongly signed requests with large bodies writes at most one
    short line per request (fewer: they are rate-limited) and none of the body."""
    marker = "FLOODMARKER"
    body = json.dumps({"KeyId": marker * 80_000}).encode()  # ~880 KB, under the body limit
    bad_auth = {
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIANOTAKEY/20260101/us-east-1/kms/"
        "aws4_request, SignedHeaders=host;x-amz-date;x-amz-target, Signature=00",
        "X-Amz-Date": "20260101T000000Z",
    }
    target = {"X-Amz-Target": "TrentService.DescribeKey"}
    size_before = live.audit_path.stat().st_size if live.audit_path.exists() else 0
    for extra in ({}, bad_auth):
        for _ in range(30):
            resp = _unsigned(live.url, "POST", "/", body, **KMS_HEADERS, **target, **extra)
            assert resp.status == 400
    live.runtime.audit.flush()
    grown = live.audit_path.stat().st_size - size_before
    assert grown < 60 * 1024, grown  # 60 requests of ~880 KB each wrote under 1 KB apiece
    events = live.events()
    assert not any(marker in json.dumps(e) for e in events)
    anonymous = [
        e for e in events if e["principalArn"] is None and e["eventName"] != "AuditEventsSuppressed"
    ]
    assert anonymous
    assert all(not e["requestParameters"] for e in anonymous)


OTHER_ROUTES = [
    ("GET", "/"),
    ("PUT", "/"),
    ("DELETE", "/"),
    ("PATCH", "/"),
    ("OPTIONS", "/"),
    ("HEAD", "/"),
    ("POST", "/health"),
    ("POST", "/metrics"),
    ("PUT", "/health"),
    ("DELETE", "/metrics"),
    ("HEAD", "/health"),
    ("GET", "/health/"),
    ("GET", "/metrics/"),
    ("GET", "/Health"),
    ("GET", "/healthz"),
    ("GET", "/admin"),
    ("POST", "/kms"),
    ("POST", "/?Action=ListKeys"),
]


def test_every_other_method_and_path_is_refused_unsigned(live) -> None:
    target = {"X-Amz-Target": "TrentService.ListKeys"}
    for method, path in OTHER_ROUTES:
        resp = _unsigned(live.url, method, path, b"{}", **KMS_HEADERS, **target)
        assert resp.status == 400, (method, path, resp.status, resp.data)
        if method != "HEAD":
            assert json.loads(resp.data)["__type"] in REFUSED, (method, path, resp.data)
        assert b"hsmbridge_requests" not in resp.data, (method, path)
        assert live.store_id.encode() not in resp.data, (method, path)
