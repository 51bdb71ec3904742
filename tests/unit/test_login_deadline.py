"""A request's lazy kmsuser login is bounded by its deadline.

StoreConnections makes logins one at a time (two C_Logins on one token leak a session), so a
login stuck in the HSM made every other request that needed a first login wait for it, past its
deadline. Now a request waits for another's login no longer than its deadline, and one whose
deadline has passed never starts a C_Login.
"""

from __future__ import annotations

import threading
import time

import pytest

from hsmbridge import deadline
from hsmbridge.backend import DeadlineExceededError
from hsmbridge.service.connections import StoreConnections
from tests.fakes import FakeBackend, FakeConnector


class SlowConnector(FakeConnector):
    """Logins to `slow` block until `release` is set."""

    def __init__(self) -> None:
        super().__init__({"cluster-slow": "pw", "cluster-fast": "pw"})
        self.release = threading.Event()
        self.started = threading.Event()

    def connect(self, cluster_id: str, password: str) -> FakeBackend:
        if cluster_id == "cluster-slow":
            self.started.set()
            self.release.wait(10)
        return super().connect(cluster_id, password)


def test_a_request_waits_for_another_login_no_longer_than_its_deadline() -> None:
    connector = SlowConnector()
    connections = StoreConnections(connector)
    stuck = threading.Thread(
        target=connections.get, args=("cks-slow", "cluster-slow", lambda: "pw"), daemon=True
    )
    stuck.start()
    assert connector.started.wait(5)
    try:
        began = time.monotonic()
        with deadline.within(0.3), pytest.raises(DeadlineExceededError):
            connections.get("cks-fast", "cluster-fast", lambda: "pw")
        assert time.monotonic() - began < 2.0
        assert connections.peek("cks-fast") is None
    finally:
        connector.release.set()
        stuck.join(5)
    # Once the stuck login is done, the same request succeeds.
    with deadline.within(5):
        assert connections.get("cks-fast", "cluster-fast", lambda: "pw") is not None


def test_a_request_past_its_deadline_never_starts_a_login() -> None:
    connector = FakeConnector({"cluster-a": "pw"})
    connections = StoreConnections(connector)
    with deadline.within(-1.0), pytest.raises(DeadlineExceededError):
        connections.get("cks-a", "cluster-a", lambda: "pw")
    assert connector.connects == 0
    # Without a deadline (the CLI, background work) a login is made as before.
    assert connections.get("cks-a", "cluster-a", lambda: "pw") is not None
    assert connector.connects == 1
