"""The deep health endpoint over HTTP: a real HSM ping per connected store, cached on an injected
clock, ACTIVE / DEGRADED / UNAVAILABLE per store, 200 only when every connected store is ACTIVE."""

from __future__ import annotations

import pytest

from hsmbridge.backend import HsmHealth
from hsmbridge.http.health import MAX_TTL_S, HealthChecker

pytestmark = pytest.mark.softhsm


def _backend(live):
    return live.runtime.service.ctx.connections.peek(live.store_id)


def _spy_ping(backend, result=None):
    calls = []
    real = backend.ping

    def ping():
        calls.append(1)
        return result if result is not None else real()

    backend.ping = ping  # instance attribute on the timing wrapper; the HSM is still called
    return calls


def test_active_store_is_pinged_for_real_and_cached(live):
    calls = _spy_ping(_backend(live))
    status, doc = live.health()
    assert status == 200
    assert doc["status"] == "ACTIVE"
    assert doc["cached"] is False
    store = doc["stores"][live.store_id]
    assert store["status"] == "ACTIVE"
    assert store["connectionState"] == "CONNECTED"
    assert store["pingLatencyMs"] > 0
    assert live.health()[1]["cached"] is True
    live.health_clock.advance(29)
    assert live.health()[1]["cached"] is True
    assert calls == [1]
    live.health_clock.advance(2)  # past the 30 s default TTL
    assert live.health()[1]["cached"] is False
    assert calls == [1, 1]


def test_failed_ping_is_unavailable_and_503(live):
    _spy_ping(_backend(live), HsmHealth(False, 1.0, "DeviceLostError: token removed"))
    status, doc = live.health()
    assert status == 503
    assert doc["status"] == "UNAVAILABLE"
    store = doc["stores"][live.store_id]
    assert store["status"] == "UNAVAILABLE"
    assert "token removed" in store["detail"]


def test_slow_ping_is_degraded(make_live):
    live = make_live(health_slow_ms=0.0)
    status, doc = live.health()
    assert status == 503
    assert doc["stores"][live.store_id]["status"] == "DEGRADED"
    assert "threshold" in doc["stores"][live.store_id]["detail"]


def test_cluster_below_two_active_hsms_in_two_azs_is_degraded(live):
    live.env.write_inventory(azs=("us-east-1a", "us-east-1b"), states=("ACTIVE", "DEGRADED"))
    status, doc = live.health()
    assert status == 503
    store = doc["stores"][live.store_id]
    assert store["status"] == "DEGRADED"
    assert "quorum" in store["detail"]


def _close_next_worker_session(backend) -> None:
    """C_CloseSession, behind the pool's back, on the idle worker session the next HSM call will
    be handed (the pool hands out the one released last): that call then gets a real
    SessionHandleInvalid from SoftHSM, and the backend must evict the session and open another."""
    pool = backend.inner._pool
    with pool._cond:
        worker = pool._idle[-1]
    worker.raw.close()


def test_backend_recovery_since_last_check_is_degraded(make_live):
    # A slow ping (a busy machine) is DEGRADED too, and is checked first: not what this is about.
    live = make_live(health_slow_ms=60_000.0)
    backend = _backend(live)
    assert live.health()[0] == 200
    retries = backend.stats.retries
    _close_next_worker_session(backend)
    live.health_clock.advance(MAX_TTL_S)
    status, doc = live.health()
    store = doc["stores"][live.store_id]
    assert (status, store["status"]) == (503, "DEGRADED"), store
    assert store["detail"] == "HSM sessions or login re-established 1x since last check"
    assert store["pingLatencyMs"] is not None  # the ping itself succeeded, on a new session
    assert backend.stats.retries == retries + 1
    live.health_clock.advance(MAX_TTL_S)  # no further retries: healthy again
    assert live.health()[0] == 200


def test_connected_store_without_login_here_is_logged_in_by_the_check(live):
    live.runtime.service.ctx.connections.detach(live.store_id)
    status, doc = live.health()
    assert status == 200
    assert doc["stores"][live.store_id]["status"] == "ACTIVE"
    assert _backend(live) is not None


def test_login_failure_is_unavailable(live, monkeypatch):
    ctx = live.runtime.service.ctx
    ctx.connections.detach(live.store_id)
    monkeypatch.setattr(ctx, "password_of", lambda row: "not-the-pin-1234")
    status, doc = live.health()
    assert status == 503
    store = doc["stores"][live.store_id]
    assert store["status"] == "UNAVAILABLE"
    assert store["detail"].startswith("login to the HSM failed: ")
    assert "not-the-pin" not in store["detail"]


def test_disconnected_store_is_reported_but_does_not_fail_the_check(live):
    live.kms.disconnect_custom_key_store(CustomKeyStoreId=live.store_id)
    status, doc = live.health()
    assert status == 200
    assert doc["stores"][live.store_id] == {
        "status": "UNAVAILABLE",
        "connectionState": "DISCONNECTED",
        "detail": "custom key store is DISCONNECTED",
        "pingLatencyMs": None,
    }


def test_ttl_is_capped_at_sixty_seconds(live):
    with pytest.raises(ValueError, match="0-60"):
        HealthChecker(live.runtime.service, ttl_s=61)
