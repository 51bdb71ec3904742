"""Connection floods (hardening finding F2), against the production app over a real SoftHSM2 store,
served by uvicorn on loopback, with raw sockets as the attacker and boto3 as the real client.

Before: ~2,200 idle TCP connections without credentials made every request and `/health` answer
503 (uvicorn's concurrency limit counted connections), and reopening 220/s kept it down. Now idle
connections take no request slot and are cut by the header deadline; one client address holds at
most `max_connections_per_client` connections; and requests in flight are capped by the app.

The attacker's sockets come from other loopback addresses (127.0.0.2 and up: Linux routes all of
127/8 to lo), the way a flood comes from other hosts than the real clients.
"""

from __future__ import annotations

import random
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmbridge.http.app import MAX_CONNECTIONS_PER_CLIENT, create_asgi_app
from hsmbridge.http.server import ThreadedServer

pytestmark = pytest.mark.softhsm

IDLE_CONNECTIONS = 2000
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 10)]  # 250 each: under the per-address cap
CHURN_PER_S = 220


@pytest.fixture(autouse=True)
def _enough_file_descriptors() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * IDLE_CONNECTIONS + 1024  # both ends of every socket live in this process
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"the open-file limit ({hard}) is below what the test needs ({wanted})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _idle(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.setblocking(False)
    return sock


def _closed_by_server(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the server has closed or reset so far (it never sends anything on idle ones)."""
    closed = []
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1) == b"":
                closed.append(sock)
        except ConnectionResetError:
            closed.append(sock)
        except BlockingIOError:
            pass  # open, nothing to read
    return closed


def _wait_until_closed(
    socks: list[socket.socket], count: int, within_s: float = 8.0
) -> list[socket.socket]:
    """Wait until the server has closed `count` of `socks`, then a little longer to see that it
    closes no more. A busy server accepts late (the kernel completes the handshakes first), so
    this polls instead of sleeping a fixed time; `within_s` stays under the 10 s header deadline
    that would close the rest, counted from their acceptance."""
    deadline = time.monotonic() + within_s
    closed = _closed_by_server(socks)
    while len(closed) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        closed += _closed_by_server([s for s in socks if s not in closed])
    time.sleep(0.3)
    return closed + _closed_by_server([s for s in socks if s not in closed])


class _Flood:
    """Holds idle connections from the attacker addresses and churns them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._churn, daemon=True)

    def open(self, count: int) -> None:
        for i in range(count):
            self.socks.append(_idle(self.port, ATTACKERS[i % len(ATTACKERS)]))
        self._thread.start()

    def _churn(self) -> None:
        rng = random.Random(7)
        step = 0.01
        per_step = max(1, round(CHURN_PER_S * step))
        while not self._stop.wait(step):
            for _ in range(per_step):
                i = rng.randrange(len(self.socks))
                self.socks[i].close()
                try:
                    self.socks[i] = _idle(self.port, ATTACKERS[i % len(ATTACKERS)])
                    self.reopened += 1
                except OSError:
                    return  # the server side is shutting down

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def flood(live: Any) -> Iterator[_Flood]:
    f = _Flood(live.server.port)
    yield f
    f.close()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_idle_and_churned_connections_deny_no_signed_request(live: Any, flood: _Flood) -> None:
    key_id = live.create_key()["KeyId"]
    flood.open(IDLE_CONNECTIONS)
    latencies = []
    started = time.monotonic()
    while time.monotonic() - started < 4.0 or len(latencies) < 100:
        begin = time.monotonic()
        blob = live.kms.encrypt(KeyId=key_id, Plaintext=b"through the flood")["CiphertextBlob"]
        assert live.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"through the flood"
        latencies.append(time.monotonic() - begin)
    assert flood.reopened > 2 * CHURN_PER_S  # the churn ran while the requests were served
    assert _p99(latencies) < 1.0, sorted(latencies)[-5:]
    status, body, _ = live.get("/health")
    assert status == 200, body


def test_one_address_holds_at_most_its_cap(live: Any) -> None:
    port = live.server.port
    held = [_idle(port, "127.0.0.20") for _ in range(MAX_CONNECTIONS_PER_CLIENT + 40)]
    try:
        closed = _wait_until_closed(held, 40)
        # Every connection beyond the cap is cut at once; the others stay open (idle, under the
        # header deadline).
        assert len(closed) == 40
        assert all(s in closed for s in held[MAX_CONNECTIONS_PER_CLIENT:])
        # Other clients are unaffected.
        assert live.kms.list_keys()["Keys"] == []
        # A freed slot can be used again.
        held[0].close()
        time.sleep(0.2)  # the server sees the close
        again = _idle(port, "127.0.0.20")
        held.append(again)
        assert _wait_until_closed([again], 0) == []
    finally:
        for sock in held:
            sock.close()


def test_requests_in_flight_beyond_the_cap_are_throttled(tmp_path: Any) -> None:
    """The app's own request cap (uvicorn's is off): with a cap of 2, the third concurrent
    request is answered ThrottlingException, which SDKs retry; idle sockets take no slot."""
    gate = threading.Event()
    entered = threading.Semaphore(0)

    def slow_list_keys(ctx: Any, params: Any) -> dict[str, Any]:
        entered.release()
        gate.wait(10)
        return {"Keys": [], "Truncated": False}

    app = create_asgi_app(
        operations={"ListKeys": slow_list_keys},
        verifier=None,
        region="us-east-1",
        max_request_bytes=4096,
    )
    app._max_in_flight = 2  # the production cap is 1,024; the rule is the same
    with ThreadedServer(app) as server:
        idle = [_idle(server.port, "127.0.0.30") for _ in range(50)]
        client = boto3.client(
            "kms",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="AKIAEXAMPLE",
            aws_secret_access_key="secret",  # this app has no verifier
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(str(client.list_keys()["Keys"])))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        assert entered.acquire(timeout=5)
        assert entered.acquire(timeout=5)
        with pytest.raises(ClientError) as refused:
            client.list_keys()
        assert refused.value.response["Error"]["Code"] == "ThrottlingException"
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        gate.set()
        for t in threads:
            t.join(5)
        assert results == ["[]", "[]"]
        assert client.list_keys()["Keys"] == []  # slots are given back
        for sock in idle:
            sock.close()
