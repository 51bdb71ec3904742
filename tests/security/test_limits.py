"""Request limits: tags per call (before any DB work), aliases per key, grant tokens per call,
and slow clients (a trickled body and trickled or absent headers are cut off)."""

from __future__ import annotations

import http.client
import socket
import time

import pytest
from botocore.exceptions import ClientError

from hsmbridge.api.app import create_asgi_app
from hsmbridge.api.server import ThreadedServer, _HeaderDeadline

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
    live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"ok", GrantTokens=["t"] * 10)
    with pytest.raises(ClientError) as info:
        live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"no", GrantTokens=["t"] * 11)
    assert _code(info) == "ValidationException"
    assert "grantTokens" in info.value.response["Error"]["Message"]
    event = live.events()[-1]
    assert (event["errorCode"], event["hsmLatencyMs"]) == ("ValidationException", None)


@pytest.fixture
def slow_server(monkeypatch):
    monkeypatch.setattr(_HeaderDeadline, "header_timeout_s", 0.5)
    app = create_asgi_app(
        operations={"ListKeys": lambda ctx, p: {"Keys": []}},
        verifier=None,
        region="us-east-1",
        max_request_bytes=4096,
        body_timeout_s=0.5,
    )
    with ThreadedServer(app) as srv:
        yield srv


def _closed_within(
    sock: socket.socket, seconds: float, trickle: bytes = b""
) -> tuple[bytes, float]:
    """Read until the server closes; optionally keep trickling. Returns (bytes read, elapsed)."""
    start = time.monotonic()
    sock.settimeout(0.1)
    data = b""
    while time.monotonic() - start < seconds:
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
    raise AssertionError(f"connection still open after {seconds} s; read {data!r}")


def test_stalled_body_gets_an_error_and_the_connection_closes(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(HEAD)  # 1 of 100 declared bytes, then nothing
        data, elapsed = _closed_within(sock, 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in head.lower()
    assert b'"__type":"SerializationException"' in body
    assert b"not received within 0.5 seconds" in body
    assert 0.4 < elapsed < 3


def test_trickled_body_is_cut_off(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(HEAD)
        _, elapsed = _closed_within(sock, 5, trickle=b" ")
    assert elapsed < 3


@pytest.mark.parametrize("first_bytes", [b"", b"POST / HTTP/1.1\r\nHo"])
def test_absent_or_trickled_headers_are_cut_off(slow_server, first_bytes):
    with socket.create_connection(("127.0.0.1", slow_server.port)) as sock:
        sock.sendall(first_bytes)
        _, elapsed = _closed_within(sock, 5, trickle=b"s" if first_bytes else b"")
    assert elapsed < 3


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
