"""/metrics scraped over HTTP after real boto3 calls, parsed with prometheus_client's parser."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families

from hsmbridge.http.metrics import Metrics

pytestmark = pytest.mark.softhsm


def scrape(live):
    status, body, content_type = live.get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families, family, sample_name, **labels):
    for sample in families[family].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def test_requests_latency_hsm_and_store_metrics(live):
    kms = live.kms
    key = live.create_key()
    for _ in range(3):
        blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"m")["CiphertextBlob"]
    kms.decrypt(CiphertextBlob=blob)
    with pytest.raises(ClientError):
        kms.describe_key(KeyId="alias/absent")
    m = scrape(live)

    assert (
        value(
            m, "hsmbridge_requests", "hsmbridge_requests_total", operation="Encrypt", outcome="ok"
        )
        == 3
    )
    assert (
        value(
            m,
            "hsmbridge_requests",
            "hsmbridge_requests_total",
            operation="DescribeKey",
            outcome="NotFoundException",
        )
        == 1
    )
    count = value(
        m,
        "hsmbridge_request_duration_seconds",
        "hsmbridge_request_duration_seconds_count",
        operation="Encrypt",
    )
    assert count == 3
    inf = value(
        m,
        "hsmbridge_request_duration_seconds",
        "hsmbridge_request_duration_seconds_bucket",
        operation="Encrypt",
        le="+Inf",
    )
    assert inf == 3
    assert (
        value(
            m,
            "hsmbridge_hsm_call_duration_seconds",
            "hsmbridge_hsm_call_duration_seconds_count",
            call="encrypt",
        )
        == 3
    )
    assert (
        value(
            m,
            "hsmbridge_hsm_call_duration_seconds",
            "hsmbridge_hsm_call_duration_seconds_count",
            call="generate_key",
        )
        == 1
    )
    assert (
        value(
            m,
            "hsmbridge_hsm_call_duration_seconds",
            "hsmbridge_hsm_call_duration_seconds_sum",
            call="decrypt",
        )
        > 0
    )
    assert (
        value(m, "hsmbridge_hsm_sessions_in_use", "hsmbridge_hsm_sessions_in_use") == 0
    )  # idle now

    sid = live.store_id
    assert (
        value(
            m, "hsmbridge_hsm_sessions_open", "hsmbridge_hsm_sessions_open", custom_key_store_id=sid
        )
        >= 2
    )
    hits = value(
        m,
        "hsmbridge_hsm_handle_cache_hits",
        "hsmbridge_hsm_handle_cache_hits_total",
        custom_key_store_id=sid,
    )
    misses = value(
        m,
        "hsmbridge_hsm_handle_cache_misses",
        "hsmbridge_hsm_handle_cache_misses_total",
        custom_key_store_id=sid,
    )
    assert hits >= 4  # three Encrypts and a Decrypt, all served from the handle cache
    assert misses is not None
    states = {
        s.labels["state"]: s.value
        for s in m["hsmbridge_custom_key_store_state"].samples
        if s.labels["custom_key_store_id"] == sid
    }
    assert states["CONNECTED"] == 1
    assert sum(states.values()) == 1
    assert set(states) >= {"CONNECTED", "CONNECTING", "DISCONNECTED", "DISCONNECTING", "FAILED"}


def test_store_state_follows_disconnect(live):
    live.kms.disconnect_custom_key_store(CustomKeyStoreId=live.store_id)
    m = scrape(live)
    assert (
        value(
            m,
            "hsmbridge_custom_key_store_state",
            "hsmbridge_custom_key_store_state",
            custom_key_store_id=live.store_id,
            state="DISCONNECTED",
        )
        == 1
    )
    # No login left in this process, so no session gauges for the store.
    assert (
        value(
            m,
            "hsmbridge_hsm_sessions_open",
            "hsmbridge_hsm_sessions_open",
            custom_key_store_id=live.store_id,
        )
        is None
    )


def test_registries_are_private_per_app():
    a, b = Metrics(), Metrics()
    a.observe_request("Encrypt", None, 0.001)
    text_b = b.render()[0].decode()
    assert 'operation="Encrypt"' not in text_b
    assert (
        'hsmbridge_requests_total{operation="Encrypt",outcome="ok"} 1.0' in a.render()[0].decode()
    )


def test_label_children_are_cached():
    metrics = Metrics()
    metrics.observe_request("Encrypt", None, 0.001)
    metrics.observe_request("Encrypt", None, 0.002)
    metrics.observe_request("Encrypt", "DisabledException", 0.002)
    assert len(metrics._request_children) == 2
    assert len(metrics._latency_children) == 1
