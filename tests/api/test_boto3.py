"""Public behaviour through real boto3 KMS clients against the in-process server."""

from __future__ import annotations

import base64
import json
import time

import pytest
from botocore.exceptions import ClientError

from tests.api.conftest import (
    HANDLER_DELAY_S,
    LEAK_SENTINEL,
    PRINCIPAL_ARN,
    make_client,
    send,
    signed,
    wait_for,
)
from tests.output_shapes import output_validate


def _error(info: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    response = info.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


def test_generate_random_roundtrip(kms):
    result = kms.generate_random(NumberOfBytes=17)
    assert len(result["Plaintext"]) == 17
    assert result["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert result["ResponseMetadata"]["RequestId"]


def test_list_keys(kms):
    result = kms.list_keys()
    assert result["Keys"] == []
    assert result["Truncated"] is False


def test_principal_reaches_handler(kms):
    assert kms.get_public_key(KeyId="k")["KeyId"] == PRINCIPAL_ARN


def test_kms_error_maps_to_code_and_400(kms):
    with pytest.raises(ClientError) as info:
        kms.describe_key(KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")
    code, status, message = _error(info)
    assert (code, status) == ("NotFoundException", 400)
    assert "does not exist" in message


def test_runtime_error_is_generic_internal_500(kms):
    with pytest.raises(ClientError) as info:
        kms.encrypt(KeyId="alias/x", Plaintext=b"hello")
    code, status, message = _error(info)
    assert (code, status) == ("KMSInternalException", 500)
    assert LEAK_SENTINEL not in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    ("call", "code", "status"),
    [
        (lambda c: c.decrypt(CiphertextBlob=b"x" * 16), "DependencyTimeoutException", 503),
        (lambda c: c.get_key_policy(KeyId="k"), "KeyUnavailableException", 500),
    ],
)
def test_fault_statuses(kms, call, code, status):
    with pytest.raises(ClientError) as info:
        call(kms)
    assert _error(info)[:2] == (code, status)


def test_unknown_access_key(server):
    client = make_client(server, access_key="AKIANOBODYKNOWSTHIS0")
    with pytest.raises(ClientError) as info:
        client.list_keys()
    assert _error(info) == (
        "UnrecognizedClientException",
        400,
        "The security token included in the request is invalid.",
    )


def test_wrong_secret(server):
    client = make_client(server, secret_key="not-the-secret")
    with pytest.raises(ClientError) as info:
        client.list_keys()
    code, status, message = _error(info)
    assert (code, status) == ("InvalidSignatureException", 400)
    assert message.startswith("The request signature we calculated does not match")


def test_wrong_region(server):
    client = make_client(server, region="eu-west-1")
    with pytest.raises(ClientError) as info:
        client.list_keys()
    code, _, message = _error(info)
    assert code == "InvalidSignatureException"
    assert "Credential should be scoped to a valid region, not 'eu-west-1'" in message


def test_expired_signature_via_server_clock(server, stand):
    from datetime import timedelta

    stand.skew = timedelta(minutes=20)  # the server is 20 min ahead: the client's date is stale
    try:
        with pytest.raises(ClientError) as info:
            make_client(server).list_keys()
    finally:
        stand.skew = timedelta(0)
    code, _, message = _error(info)
    assert code == "InvalidSignatureException"
    assert message.startswith("Signature expired: ")
    assert "is now earlier than" in message
    assert message.endswith(" - 5 min.)")


def test_unsupported_kms_operation(kms):
    with pytest.raises(ClientError) as info:
        kms.create_key()
    code, status, message = _error(info)
    assert (code, status) == ("UnsupportedOperationException", 400)
    assert "CreateKey" in message


def test_model_validation_number_of_bytes(server):
    client = make_client(server, validate=False)  # let the bad value reach the server
    with pytest.raises(ClientError) as info:
        client.generate_random(NumberOfBytes=0)
    assert _error(info) == (
        "ValidationException",
        400,
        "1 validation error detected: Value '0' at 'numberOfBytes' failed to satisfy"
        " constraint: Member must have value greater than or equal to 1",
    )


def test_model_validation_key_id_too_long(server, stand):
    before = stand.calls.get("DescribeKey", 0)
    client = make_client(server, validate=False)
    with pytest.raises(ClientError) as info:
        client.describe_key(KeyId="k" * 2049)
    code, _, message = _error(info)
    assert code == "ValidationException"
    assert message.startswith("1 validation error detected: Value 'kkk")
    assert message.endswith(
        "at 'keyId' failed to satisfy constraint: "
        "Member must have length less than or equal to 2048"
    )
    assert stand.calls.get("DescribeKey", 0) == before  # the handler never ran


def test_oversize_body_is_validation_error(kms, stand):
    with pytest.raises(ClientError) as info:
        kms.encrypt(KeyId="k", Plaintext=b"p" * 4096)
    code, status, message = _error(info)
    assert (code, status) == ("ValidationException", 400)
    assert "too large" in message


def test_events_redact_plaintext(kms, stand):
    plaintext = b"very secret plaintext bytes"
    with pytest.raises(ClientError) as info:
        kms.encrypt(KeyId="alias/audit", Plaintext=plaintext)
    request_id = info.value.response["ResponseMetadata"]["RequestId"]
    wait_for(lambda: any(e.request_id == request_id for e in stand.events))
    event = next(e for e in stand.events if e.request_id == request_id)
    assert event.operation == "Encrypt"
    assert event.principal_arn == PRINCIPAL_ARN
    assert (event.status, event.error_code) == (500, "KMSInternalException")
    assert event.params_redacted["KeyId"] == "alias/audit"
    assert event.params_redacted["Plaintext"] == "<redacted>"
    assert base64.b64encode(plaintext).decode() not in repr(event)


def test_success_event(kms, stand):
    result = kms.list_keys(Limit=5)
    request_id = result["ResponseMetadata"]["RequestId"]
    wait_for(lambda: any(e.request_id == request_id for e in stand.events))
    event = next(e for e in stand.events if e.request_id == request_id)
    assert (event.status, event.error_code, event.operation) == (200, None, "ListKeys")
    assert event.params_redacted == {"Limit": 5}


def test_event_duration_covers_the_handler_in_milliseconds(kms, stand):
    # Both bounds are causal, so no machine is too slow for them: the handler sleeps
    # HANDLER_DELAY_S inside the measured span, and the span ends before the event is emitted.
    began = time.perf_counter()
    result = kms.get_key_rotation_status(KeyId="k")
    request_id = result["ResponseMetadata"]["RequestId"]
    wait_for(lambda: any(e.request_id == request_id for e in stand.events))
    bound_ms = (time.perf_counter() - began) * 1000.0
    event = next(e for e in stand.events if e.request_id == request_id)
    assert HANDLER_DELAY_S * 1000.0 <= event.duration_ms <= bound_ms


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("GenerateRandom", {"NumberOfBytes": 2}),
        ("ListKeys", {}),
        ("GetPublicKey", {"KeyId": "k"}),
        ("GetKeyRotationStatus", {"KeyId": "k"}),
    ],
)
def test_stand_in_outputs_match_model(server, operation, params):
    # What the server put on the wire for each stand-in that succeeds, not a hand-written copy.
    resp = send(
        signed(server.endpoint_url, f"TrentService.{operation}", json.dumps(params).encode())
    )
    assert resp.status == 200, resp.body
    assert output_validate(operation, resp.json) == []


def test_output_validate_catches_wrong_types():
    assert output_validate("ListKeys", {"Keys": [{"KeyId": 7}]})
