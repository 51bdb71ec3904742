"""The audit trail through the real server: exactly one CloudTrail-like JSON-lines event per API
call, with the key, the store and the HSM latency the service annotated, secrets redacted, and
the end-of-waiting-period DeleteKey service event recording backingKeysDeletionStatus."""

from __future__ import annotations

import re
import stat
import time

import pytest
from botocore.exceptions import ClientError

from hsmbridge.trail.events import AuditEvent
from hsmbridge.trail.sinks import BufferedJsonLinesSink
from tests.harness import ACCOUNT

pytestmark = pytest.mark.softhsm

FIELDS = {
    "eventTime", "eventName", "eventType", "eventSource", "requestId", "principalArn",
    "sourceIPAddress", "requestParameters", "keyArn", "customKeyStoreId", "errorCode",
    "hsmLatencyMs", "additionalEventData",
}  # fmt: skip
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PRINCIPAL = f"arn:aws:iam::{ACCOUNT}:user/tester"


def _request_id(call):
    try:
        return call()["ResponseMetadata"]["RequestId"], None
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["RequestId"], exc.response["Error"]["Code"]


def _api_events(live):
    return [e for e in live.events() if e["eventType"] == "AwsApiCall"]


def test_exactly_one_event_per_call_with_matching_request_ids(live):
    kms = live.kms
    key = live.create_key()
    before = len(_api_events(live))
    calls = [
        lambda: kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
        lambda: kms.describe_key(KeyId=key["KeyId"]),
        lambda: kms.describe_key(KeyId="alias/does-not-exist"),
        lambda: kms.disable_key(KeyId=key["KeyId"]),
        lambda: kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
        kms.list_keys,
        lambda: kms.generate_random(NumberOfBytes=8, CustomKeyStoreId=live.store_id),
    ]
    seen = [_request_id(call) for call in calls]
    events = _api_events(live)[before:]
    assert [(e["requestId"], e["errorCode"]) for e in events] == seen
    assert [code for _, code in seen] == [
        None, None, "NotFoundException", None, "DisabledException", None, None,
    ]  # fmt: skip
    for event in events:
        assert set(event) == FIELDS
        assert ISO_Z.match(event["eventTime"])
        assert event["principalArn"] == PRINCIPAL
        assert event["sourceIPAddress"] == "127.0.0.1"
        assert event["eventSource"] == "kms.amazonaws.com"


def test_an_unsupported_kms_operation_is_audited_under_its_name(live):
    with pytest.raises(ClientError) as caught:
        live.kms.get_public_key(KeyId="alias/x")
    assert caught.value.response["Error"]["Code"] == "UnsupportedOperationException"
    event = _api_events(live)[-1]
    assert (event["eventName"], event["errorCode"]) == (
        "GetPublicKey",
        "UnsupportedOperationException",
    )


def test_encrypt_event_names_key_store_and_hsm_latency_without_plaintext(live):
    key = live.create_key()
    live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"audit-me", EncryptionContext={"a": "b"})
    event = _api_events(live)[-1]
    assert event["eventName"] == "Encrypt"
    assert event["keyArn"] == key["Arn"]
    assert event["customKeyStoreId"] == live.store_id
    assert event["hsmLatencyMs"] > 0
    params = event["requestParameters"]
    assert params == {
        "KeyId": key["KeyId"],
        "Plaintext": "<redacted>",
        "EncryptionContext": {"a": "b"},
    }
    assert event["additionalEventData"]["status"] == 200


def test_create_key_is_one_event_carrying_the_service_facts(live):
    before = len(live.events())
    key = live.create_key()
    new = live.events()[before:]
    assert [e["eventName"] for e in new] == ["CreateKey"]  # the service's event was folded in
    [event] = new
    assert event["keyArn"] == key["Arn"]
    assert event["customKeyStoreId"] == live.store_id
    assert event["additionalEventData"]["backingKeyId"] == key["KeyId"]
    assert event["additionalEventData"]["clusterId"] == live.env.cluster_id
    assert event["hsmLatencyMs"] > 0


def test_key_store_events_redact_the_password_and_name_the_store(make_live):
    live = make_live(store=False)
    store_id = live.create_store()
    live.connect(store_id)
    events = _api_events(live)
    create = next(e for e in events if e["eventName"] == "CreateCustomKeyStore")
    assert create["customKeyStoreId"] == store_id
    assert create["requestParameters"]["KeyStorePassword"] == "<redacted>"
    connect = next(e for e in events if e["eventName"] == "ConnectCustomKeyStore")
    assert connect["customKeyStoreId"] == store_id


def test_reencrypt_records_both_keys(live):
    kms = live.kms
    source = live.create_key()
    dest = live.create_key()
    blob = kms.encrypt(KeyId=source["KeyId"], Plaintext=b"move me")["CiphertextBlob"]
    kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=dest["KeyId"])
    event = _api_events(live)[-1]
    assert event["eventName"] == "ReEncrypt"
    assert {event["keyArn"], *event["additionalEventData"]["otherKeyArns"]} == {
        source["Arn"],
        dest["Arn"],
    }
    assert event["requestParameters"]["CiphertextBlob"] == "<redacted>"


@pytest.mark.parametrize(("connected", "status"), [(True, "SUCCESS"), (False, "FAILURE")])
def test_deletion_records_backing_keys_deletion_status(live, connected, status):
    key = live.create_key()
    backend = live.runtime.service.ctx.connections.peek(live.store_id)
    assert backend.find_keys(key["Arn"])
    live.kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    if not connected:
        live.kms.disconnect_custom_key_store(CustomKeyStoreId=live.store_id)
    live.env.clock.advance(7 * 86_400 + 1)
    assert live.runtime.service.deletions.sweep() == 1
    [event] = [e for e in live.events() if e["eventName"] == "DeleteKey"]
    assert event["eventType"] == "AwsServiceEvent"
    assert event["requestId"] is None  # no API call: the service did it
    assert event["keyArn"] == key["Arn"]
    assert event["customKeyStoreId"] == live.store_id
    extra = event["additionalEventData"]
    assert extra["clusterId"] == live.env.cluster_id
    assert extra["backingKeys"] == [{"backingKeyId": key["KeyId"], "keyLabel": key["Arn"]}]
    [deletion] = extra["backingKeysDeletionStatus"]
    assert deletion["backingKeyId"] == key["KeyId"]
    assert deletion["deletionStatus"] == status
    if connected:
        assert deletion["objectsDestroyed"] == 1
        assert backend.find_keys(key["Arn"]) == []


def test_audit_file_is_private_and_flushed_without_being_asked(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = BufferedJsonLinesSink(path, flush_interval_s=0.05)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sink.emit(AuditEvent("ListKeys", event_time=0.0, request_id="r-1"))
        deadline = time.monotonic() + 5
        while not path.read_text():
            assert time.monotonic() < deadline, "the flusher never wrote the event"
            time.sleep(0.02)
    finally:
        sink.close()
    sink.emit(AuditEvent("ListKeys"))  # after close: dropped, never raises
    [line] = path.read_text().splitlines()
    assert '"eventTime":"1970-01-01T00:00:00.000Z"' in line
    assert '"requestId":"r-1"' in line


def test_close_flushes_buffered_events(tmp_path):
    path = tmp_path / "audit.jsonl"
    sink = BufferedJsonLinesSink(path, flush_interval_s=3600)
    for i in range(100):  # signed: unauthenticated requests' events are rate-limited
        sink.emit(AuditEvent("Encrypt", request_id=f"r-{i}", principal_arn=PRINCIPAL))
    sink.close()
    assert len(path.read_text().splitlines()) == 100


def test_existing_audit_file_is_tightened(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o644)
    BufferedJsonLinesSink(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
