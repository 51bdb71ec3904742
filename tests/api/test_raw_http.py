"""Requests boto3 would never send: tampering, bad framing, bad JSON, other targets."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.api.conftest import MAX_REQUEST_BYTES, send, signed


def _assert_error(resp, code, status=400):
    assert resp.status == status
    assert resp.headers["content-type"] == "application/x-amz-json-1.1"
    assert resp.headers["x-amzn-requestid"]
    assert resp.json["__type"] == code
    return resp.json["message"]


def test_signed_raw_request_succeeds(server):
    resp = send(signed(server.endpoint_url, "TrentService.ListKeys", b"{}"))
    assert resp.status == 200
    assert resp.json == {"Keys": [], "Truncated": False}
    assert resp.headers["x-amzn-requestid"]


def test_body_changed_after_signing(server):
    request = signed(server.endpoint_url, "TrentService.GenerateRandom", b'{"NumberOfBytes":8}')
    resp = send(request, body=b'{"NumberOfBytes":9}')
    message = _assert_error(resp, "InvalidSignatureException")
    assert "x-amz-content-sha256" in message or "does not match" in message


def test_header_swapped_after_signing(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    request.headers.replace_header("X-Amz-Target", "TrentService.GenerateRandom")
    message = _assert_error(send(request), "InvalidSignatureException")
    assert message.startswith("The request signature we calculated does not match")


def test_missing_authentication(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    del request.headers["Authorization"]
    assert _assert_error(send(request), "MissingAuthenticationTokenException") == (
        "Missing Authentication Token"
    )


def test_incomplete_signature(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}")
    request.headers.replace_header("Authorization", "AWS4-HMAC-SHA256 Credential=AKID/x")
    message = _assert_error(send(request), "IncompleteSignatureException")
    assert "'SignedHeaders'" in message
    assert "'Signature'" in message


def test_wrong_service_scope(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{}", service="sqs")
    assert _assert_error(send(request), "InvalidSignatureException") == (
        "Credential should be scoped to correct service: 'kms'. "
    )


def test_malformed_json(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"{not json")
    _assert_error(send(request), "SerializationException")


def test_non_object_json(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"[1, 2]")
    _assert_error(send(request), "SerializationException")


def test_wrong_json_type(server):
    body = b'{"NumberOfBytes": "12"}'
    request = signed(server.endpoint_url, "TrentService.GenerateRandom", body)
    assert "numberOfBytes" in _assert_error(send(request), "SerializationException")


def test_json_nesting_limit(server):
    body = json.dumps({"Limit": 1, "Deep": json.loads("[" * 30 + "]" * 30)}).encode()
    request = signed(server.endpoint_url, "TrentService.ListKeys", body)
    assert "nesting" in _assert_error(send(request), "SerializationException")


def test_unknown_members_are_ignored(server):
    request = signed(server.endpoint_url, "TrentService.ListKeys", b'{"Bogus": [1], "Limit": 2}')
    assert send(request).status == 200


@pytest.mark.parametrize(
    "target", ["TrentService.NoSuchOperation", "DynamoDB_20120810.ListTables", None]
)
def test_unknown_targets(server, target):
    _assert_error(send(signed(server.endpoint_url, target, b"{}")), "UnknownOperationException")


def test_wrong_content_type(server):
    request = signed(
        server.endpoint_url, "TrentService.ListKeys", b"{}", content_type="application/json"
    )
    _assert_error(send(request), "UnknownOperationException")


def test_oversize_declared_content_length(server):
    body = b'{"KeyId": "' + b"k" * MAX_REQUEST_BYTES + b'"}'
    request = signed(server.endpoint_url, "TrentService.DescribeKey", body)
    assert "too large" in _assert_error(send(request), "ValidationException")


def _post_raw(server, body, headers: dict[str, str], *, chunked: bool = False) -> tuple[int, str]:
    """One POST through http.client (which can stream a chunked body); (status, __type)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["__type"]
    finally:
        conn.close()


def test_oversize_chunked_body(server):
    chunks = [b"{" + b" " * 1000] * 8  # no Content-Length: the limit applies while streaming
    # Signed (the signature's headers are checked before the body is read), then streamed.
    request = signed(server.endpoint_url, "TrentService.ListKeys", b"".join(chunks))
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    answer = _post_raw(server, iter(chunks), headers, chunked=True)
    assert answer == (400, "ValidationException")


def test_unsigned_body_is_refused_before_it_is_read(server):
    # No Authorization header: refused on the headers alone, whatever the body holds.
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.ListKeys",
    }
    answer = _post_raw(server, b"{not json at all", headers)
    assert answer == (400, "MissingAuthenticationTokenException")


def test_other_routes(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok"})
    conn.request("GET", "/")
    resp = conn.getresponse()
    assert resp.status == 400
    assert json.loads(resp.read())["__type"] == "UnknownOperationException"
    conn.close()
