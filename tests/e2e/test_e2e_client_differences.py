"""Differences an unmodified client could see between hsmbridge and KMS, each pinned through boto3
(or a raw signed request) against the shared e2e server:

* Sign, Verify, GenerateMac and VerifyMac answer as KMS does for a symmetric encryption key
  (InvalidKeyUsageException, NotFoundException for an unknown key), and an operation hsmbridge
  does not implement is refused only after the request's signature is checked;
* ReEncrypt refuses encryption algorithms other than SYMMETRIC_DEFAULT;
* ListResourceTags resumes after a marker whose tag was removed between pages;
* timestamps go out as epoch seconds with millisecond precision;
* a `Recipient` (attestation document) is refused instead of being ignored.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.e2e.e2e_support import expect_error, send_raw
from tests.harness import ACCESS_KEY, REGION

pytestmark = pytest.mark.softhsm

UNKNOWN_KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"
HTTP = urllib3.PoolManager()

SIGNING = {"Message": b"m", "SigningAlgorithm": "ECDSA_SHA_256"}
MAC = {"Message": b"m", "MacAlgorithm": "HMAC_SHA_256"}
WRONG_USAGE_CALLS = {
    "Sign": lambda kms, kid: kms.sign(KeyId=kid, **SIGNING),
    "Verify": lambda kms, kid: kms.verify(KeyId=kid, Signature=b"s", **SIGNING),
    "GenerateMac": lambda kms, kid: kms.generate_mac(KeyId=kid, **MAC),
    "VerifyMac": lambda kms, kid: kms.verify_mac(KeyId=kid, Mac=b"m", **MAC),
}
RECIPIENT = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": b"doc"}


# -- 1. Sign / Verify / GenerateMac / VerifyMac ------------------------------------------------
@pytest.mark.parametrize("operation", sorted(WRONG_USAGE_CALLS))
def test_signing_and_mac_operations_refuse_a_symmetric_key_as_kms_does(kms, key, operation):
    call = WRONG_USAGE_CALLS[operation]
    message = expect_error("InvalidKeyUsageException", lambda: call(kms, key["KeyId"]))
    assert (
        message == f"{key['Arn']} key usage is ENCRYPT_DECRYPT which is not valid for {operation}."
    )
    alias = f"alias/usage-{uuid.uuid4().hex[:12]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    expect_error("InvalidKeyUsageException", lambda: call(kms, alias))
    expect_error("NotFoundException", lambda: call(kms, UNKNOWN_KEY))


def _signed_with(url: str, operation: str, secret: str) -> urllib3.BaseHTTPResponse:
    body = json.dumps({"KeyId": UNKNOWN_KEY}).encode()
    request = AWSRequest(
        method="POST",
        url=url + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    SigV4Auth(Credentials(ACCESS_KEY, secret), "kms", REGION).add_auth(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return HTTP.request("POST", request.url, body=body, headers=headers, retries=False)


def test_an_unimplemented_operation_checks_the_signature_first(shared):
    unsigned = HTTP.request(
        "POST",
        shared.url + "/",
        body=b"{}",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.GetPublicKey",
        },
        retries=False,
    )
    assert json.loads(unsigned.data)["__type"] == "MissingAuthenticationTokenException"
    bad = _signed_with(shared.url, "GetPublicKey", "not-the-secret-key")
    assert (bad.status, json.loads(bad.data)["__type"]) == (400, "InvalidSignatureException")
    # Correctly signed, it is refused as not implemented, by name.
    good = send_raw(shared.url, "GetPublicKey", json.dumps({"KeyId": UNKNOWN_KEY}).encode())
    assert good.json["__type"] == "UnsupportedOperationException"
    assert "GetPublicKey" in good.json["message"]


# -- 2. ReEncrypt algorithms -------------------------------------------------------------------
@pytest.mark.parametrize("member", ["SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm"])
def test_re_encrypt_refuses_an_asymmetric_algorithm(kms, key, member):
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"re")["CiphertextBlob"]
    wrong = {member: "RSAES_OAEP_SHA_256"}
    message = expect_error(
        "InvalidKeyUsageException",
        lambda: kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=key["KeyId"], **wrong),
    )
    assert member in message
    assert "RSAES_OAEP_SHA_256" in message
    ok = kms.re_encrypt(
        CiphertextBlob=blob,
        DestinationKeyId=key["KeyId"],
        SourceEncryptionAlgorithm="SYMMETRIC_DEFAULT",
        DestinationEncryptionAlgorithm="SYMMETRIC_DEFAULT",
    )
    assert ok["SourceEncryptionAlgorithm"] == ok["DestinationEncryptionAlgorithm"]
    assert ok["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"


# -- 3. ListResourceTags marker ----------------------------------------------------------------
def test_list_resource_tags_resumes_after_a_removed_marker_tag(kms, key):
    kid = key["KeyId"]
    kms.tag_resource(KeyId=kid, Tags=[{"TagKey": k, "TagValue": k} for k in ("a", "b", "c")])
    first = kms.list_resource_tags(KeyId=kid, Limit=1)
    assert ([t["TagKey"] for t in first["Tags"]], first["Truncated"]) == (["a"], True)
    kms.untag_resource(KeyId=kid, TagKeys=[first["NextMarker"]])
    second = kms.list_resource_tags(KeyId=kid, Limit=1, Marker=first["NextMarker"])
    assert ([t["TagKey"] for t in second["Tags"]], second["Truncated"]) == (["b"], True)
    kms.untag_resource(KeyId=kid, TagKeys=["b", "c"])  # the rest goes too: an empty last page
    last = kms.list_resource_tags(KeyId=kid, Limit=1, Marker=second["NextMarker"])
    assert (last["Tags"], last["Truncated"]) == ([], False)


# -- 4. Timestamps -----------------------------------------------------------------------------
def _decimals(number: str) -> int:
    return len(number.partition(".")[2])


def _timestamps(doc: Any) -> list[str]:
    """Every *Date member's number, as the text the server sent."""
    found: list[str] = []
    if isinstance(doc, dict):
        for name, value in doc.items():
            if name.endswith("Date") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_timestamps(value))
    elif isinstance(doc, list):
        for value in doc:
            found.extend(_timestamps(value))
    return found


def _raw(shared, operation: str, params: dict[str, Any]) -> list[str]:
    answer = send_raw(shared.url, operation, json.dumps(params).encode())
    assert answer.status == 200, answer.body
    return _timestamps(json.loads(answer.body, parse_float=str, parse_int=str))


def test_timestamps_are_sent_with_millisecond_precision(shared):
    kms = shared.kms
    shared.env.clock.advance(0.0051818)  # the stored times now have sub-millisecond digits
    key = shared.create_key("timestamps")
    kid = key["KeyId"]
    alias = f"alias/ts-{uuid.uuid4().hex[:12]}"
    kms.create_alias(AliasName=alias, TargetKeyId=kid)
    stamps = _raw(shared, "DescribeKey", {"KeyId": kid})
    stamps += _raw(shared, "ListAliases", {"KeyId": kid})
    stamps += _raw(shared, "DescribeCustomKeyStores", {"CustomKeyStoreId": shared.store_id})
    stamps += _raw(shared, "ScheduleKeyDeletion", {"KeyId": kid, "PendingWindowInDays": 7})
    stamps += _raw(shared, "DescribeKey", {"KeyId": kid})  # now with its DeletionDate
    kms.cancel_key_deletion(KeyId=kid)
    assert len(stamps) == 7  # 3 CreationDate, the alias's 2 dates, 2 DeletionDate
    assert all(_decimals(s) <= 3 for s in stamps), stamps
    assert any(_decimals(s) == 3 for s in stamps), stamps  # rounded, not truncated to seconds


# -- 5. Recipient ------------------------------------------------------------------------------
def test_recipient_is_refused_never_ignored(kms, key):
    kid = key["KeyId"]
    blob = kms.encrypt(KeyId=kid, Plaintext=b"secret")["CiphertextBlob"]
    calls = [
        lambda: kms.decrypt(CiphertextBlob=blob, Recipient=RECIPIENT),
        lambda: kms.generate_data_key(KeyId=kid, KeySpec="AES_256", Recipient=RECIPIENT),
        lambda: kms.generate_random(NumberOfBytes=16, Recipient=RECIPIENT),
    ]
    for call in calls:
        message = expect_error("ValidationException", call)
        assert "Recipient" in message
        assert "attestation document" in message
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"
