"""Request limits: tags per call (before any DB work), aliases per key, grant tokens per call,
and slow clients (a trickled body and trickled or absent headers are cut off)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import time

import pytest
from botocore.exceptions import ClientError

from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer, _HeaderDeadline
from tests.callers import ADMIN_ARN as PRINCIPAL_ARN

HEAD = (
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
    b"X-Amz-Target: TrentService.ListKeys\r\nContent-Length: 100\r\n\r\n{"
)


def _code(info) -> str:
    return info.value.response["Error"]["Code"]


def _tags(n: int) -> list[dict[str, str]]:
    return [{"TagKey": f"k{i}", "TagValue": "v"} for i in range(n)]


@pytest.mark.softhsm
def test_more_than_50_tags_fail_before_the_database_is_touched(live, monkeypatch):
    key = live.create_key()
    meta = live.runtime.service.ctx.meta
    writes = []
    real_write = meta.write
    monkeypatch.setattr(meta, "write", lambda: writes.append(1) or real_write())
    with pytest.raises(ClientError) as info:
        live.kms.tag_resource(KeyId=key["KeyId"], Tags=_tags(51))
    assert _code(info) == "TagException"
    assert "at most 50 tags" in info.value.response["Error"]["Message"]
    # A key that does not exist still gets TagException: the count is checked first.
    with pytest.raises(ClientError) as info:
        live.kms.tag_resource(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab", Tags=_tags(51))
    assert _code(info) == "TagException"
    assert writes == []
    live.kms.tag_resource(KeyId=key["KeyId"], Tags=_tags(50))
    assert len(live.kms.list_resource_tags(KeyId=key["KeyId"])["Tags"]) == 50


@pytest.mark.softhsm
def test_create_key_with_51_tags_creates_nothing(live):
    before = live.kms.list_keys()["Keys"]
    with pytest.raises(ClientError) as info:
        live.create_key(Tags=_tags(51))
    assert _code(info) == "TagException"
    assert live.kms.list_keys()["Keys"] == before
    backend = live.runtime.service.ctx.connections.peek(live.store_id)
    assert len(list(backend.list_keys())) == len(before)


@pytest.mark.softhsm
def test_fifty_aliases_per_key(live):
    key = live.create_key()
    for i in range(50):
        live.kms.create_alias(AliasName=f"alias/limit-{i}", TargetKeyId=key["KeyId"])
    with pytest.raises(ClientError) as info:
        live.kms.create_alias(AliasName="alias/limit-50", TargetKeyId=key["KeyId"])
    assert _code(info) == "LimitExceededException"
    assert len(live.kms.list_aliases(KeyId=key["KeyId"])["Aliases"]) == 50


@pytest.mark.softhsm
def test_more_than_ten_grant_tokens_are_a_validation_error_without_hsm_call(live):
    key = live.create_key()
    token = live.kms.create_grant(
        KeyId=key["KeyId"], GranteePrincipal=PRINCIPAL_ARN, Operations=["Encrypt"]
    )["GrantToken"]
    live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"ok", GrantTokens=[token] * 10)
    with pytest.raises(ClientError) as info:
        live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"no", GrantTokens=["t"])
    assert _code(info) == "InvalidGrantTokenException"
    with pytest.raises(ClientError) as info:
        live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"no", GrantTokens=[token] * 11)
    assert _code(info) == "ValidationException"
    assert "grantTokens" in info.value.response["Error"]["Message"]
    event = live.events()[-1]
    assert (event["errorCode"], event["hsmLatencyMs"]) == ("ValidationException", None)


DEADLINE_S = 0.5  # slow_server's header and body deadlines


@pytest.fixture
def slow_server(monkeypatch):
    monkeypatch.setattr(_HeaderDeadline, "header_timeout_s", DEADLINE_S)
    app = create_asgi_app(
        operations={"ListKeys": lambda ctx, p: {"Keys": []}},
        verifier=None,
        region="us-east-1",
        max_request_bytes=4096,
        body_timeout_s=DEADLINE_S,
    )
    with ThreadedServer(app) as srv:
        yield srv


# The deadlines above are DEADLINE_S. A server without them holds such a connection for the 75 s
# keep-alive or forever, so this bound separates "cut off" from "never cut off" with a wide margin
# for a busy machine; how quickly the cut-off comes is the deadline's business, checked by the
# lower bounds (measured from before the connection opens, so they hold on any machine).
CUT_OFF_WITHIN_S = 30.0


def _cut_off(port: int, first: bytes, trickle: bytes = b"") -> tuple[bytes, float]:
    """Send `first`, then read until the server closes, optionally trickling a byte per 0.1 s.
    Returns (bytes read, seconds since before the connection was opened)."""
    start = time.monotonic()  # the header deadline starts when the server accepts
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.1)
        sock.sendall(first)
        data = b""
        while time.monotonic() - start < CUT_OFF_WITHIN_S:
            try:
                if trickle:
                    sock.sendall(trickle)
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset: the server closed while we were still sending
                return data, time.monotonic() - start
            if not chunk:
                return data, time.monotonic() - start
            data += chunk
    raise AssertionError(f"connection still open after {CUT_OFF_WITHIN_S} s; read {data!r}")


def _deadline_answer(data: bytes) -> None:
    """The one answer a body deadline gives: a 400 that closes the connection."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data
    assert b"connection: close" in head.lower()
    assert b'"__type":"SerializationException"' in body
    assert b"not received within 0.5 seconds" in body


def test_stalled_body_gets_an_error_and_the_connection_closes(slow_server):
    data, elapsed = _cut_off(slow_server.port, HEAD)  # 1 of 100 declared bytes, then nothing
    _deadline_answer(data)
    assert elapsed >= DEADLINE_S - 0.1  # the deadline, not an immediate refusal


def test_trickled_body_is_cut_off(slow_server):
    # Every byte arrives well within 0.5 s of the last: only a deadline for the whole body ends
    # this (99 trickled bytes would complete the body after ~10 s, answered differently).
    data, elapsed = _cut_off(slow_server.port, HEAD, trickle=b" ")
    _deadline_answer(data)
    assert elapsed >= DEADLINE_S - 0.1


@pytest.mark.parametrize("first_bytes", [b"", b"POST / HTTP/1.1\r\nHo"])
def test_absent_or_trickled_headers_are_cut_off(slow_server, first_bytes):
    trickle = b"s" if first_bytes else b""
    data, elapsed = _cut_off(slow_server.port, first_bytes, trickle=trickle)
    assert data == b""  # no request yet, so nothing to answer: the connection just closes
    assert elapsed >= DEADLINE_S - 0.1  # the header deadline, not a parse error


def test_keep_alive_is_unaffected_by_the_header_deadline(slow_server):
    conn = http.client.HTTPConnection("127.0.0.1", slow_server.port, timeout=5)
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "TrentService.ListKeys",
    }
    try:
        conn.request("POST", "/", body=b"{}", headers=headers)
        assert conn.getresponse().read() == b'{"Keys":[]}'
        sock = conn.sock
        time.sleep(1.0)  # idle longer than the header deadline, shorter than keep-alive
        conn.request("POST", "/", body=b"{}", headers=headers)
        assert conn.getresponse().read() == b'{"Keys":[]}'
        assert conn.sock is sock  # the same connection served both
    finally:
        conn.close()


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` whole and read until the server closes or 2 s pass without data."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(2.0)
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                return data
            if not chunk:
                return data
            data += chunk


def _with_header(size: int) -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
        b"X-Amz-Target: TrentService.ListKeys\r\nX-Padding: " + b"a" * size + b"\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )


def test_headers_over_64_kib_are_refused(slow_server):
    # F10: 100 KiB of headers used to get through the 64 KiB cap.
    refused = _raw_exchange(slow_server.port, _with_header(100 * 1024))
    assert refused.startswith(b"HTTP/1.1 400 "), refused[:200]
    assert b"Request headers are too large" in refused
    # Just under the cap is an ordinary request (this app has no verifier, so it is served).
    served = _raw_exchange(slow_server.port, _with_header(60 * 1024))
    assert served.startswith(b"HTTP/1.1 200 "), served[:200]
