"""ThreadedServer and uvicorn behaviour: keep-alive, graceful stop, ops endpoints."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer

HEADERS = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.ListKeys"}


def _app(delay: float = 0.0, **kwargs):
    def list_keys(ctx, params):
        time.sleep(delay)
        return {"Keys": [], "Truncated": False}

    return create_asgi_app(
        operations={"ListKeys": list_keys},
        verifier=None,
        region="us-east-1",
        max_request_bytes=1024,
        **kwargs,
    )


def test_keep_alive_two_requests_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/", body=b"{}", headers=HEADERS)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    conn.request("POST", "/", body=b"{}", headers=HEADERS)
    second = conn.getresponse()
    second.read()
    assert conn.sock is sock  # no reconnect: the server kept the connection open
    assert first.getheader("x-amzn-RequestId") != second.getheader("x-amzn-RequestId")
    conn.close()


def test_unsigned_app_and_ops_endpoints():
    app = _app(
        health=lambda: (503, {"status": "degraded"}),
        metrics=lambda: (b"hsmbridge_up 1\n", "text/plain; version=0.0.4"),
    )
    with ThreadedServer(app) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", "/", body=b"{}", headers=HEADERS)
        assert conn.getresponse().read() == b'{"Keys":[],"Truncated":false}'
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (503, {"status": "degraded"})
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.read() == b"hsmbridge_up 1\n"
        assert resp.getheader("content-type").startswith("text/plain")
        conn.close()


def test_graceful_stop_finishes_in_flight_request():
    entered, release = threading.Event(), threading.Event()

    def list_keys(ctx, params):
        entered.set()
        release.wait(10)
        return {"Keys": [], "Truncated": False}

    app = create_asgi_app(
        operations={"ListKeys": list_keys}, verifier=None, region="us-east-1",
        max_request_bytes=1024,
    )  # fmt: skip
    srv = ThreadedServer(app).start()
    port = srv.port
    result: dict[str, object] = {}

    def call():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/", body=b"{}", headers=HEADERS)
        resp = conn.getresponse()
        result["status"], result["body"] = resp.status, resp.read()
        conn.close()

    worker = threading.Thread(target=call)
    worker.start()
    assert entered.wait(10), "the request never reached the handler"
    stopper = threading.Thread(target=srv.stop)
    stopper.start()  # stop() waits for the in-flight request, which waits for `release`
    _wait_until_refused(port)  # the listener is closed while the request is still in flight
    assert worker.is_alive(), result
    assert stopper.is_alive()
    release.set()
    worker.join(10)
    stopper.join(10)
    assert not stopper.is_alive()
    assert result == {"status": 200, "body": b'{"Keys":[],"Truncated":false}'}


def _wait_until_refused(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            probe.connect()
        except ConnectionRefusedError:
            return
        finally:
            probe.close()
        assert time.monotonic() < deadline, "the server still accepts connections"
        time.sleep(0.01)


def test_handler_table_must_name_kms_operations():
    with pytest.raises(ValueError, match="ListKey"):
        create_asgi_app(
            operations={"ListKey": lambda c, p: {}},
            verifier=None,
            region="us-east-1",
            max_request_bytes=1024,
        )


def test_handler_timeout_is_dependency_timeout():
    with ThreadedServer(_app(delay=0.5, handler_timeout_s=0.05)) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("POST", "/", body=b"{}", headers=HEADERS)
        resp = conn.getresponse()
        assert resp.status == 503
        assert json.loads(resp.read())["__type"] == "DependencyTimeoutException"
        conn.close()
