"""Contract test against botocore's KMS model (STYLE practice 9), over everything the e2e tests
put on the wire.

Runs after every other e2e module (conftest reorders it) and checks the session's
`Observations`: each 200 body validates against its operation's output shape, and each error
code the server answered is one the model lists for that operation, a common error every AWS
JSON service may send, or a documented hsmbridge divergence. A short tour of every implemented
operation runs first, so the module also stands alone (`pytest tests/e2e/test_e2e_contract.py`).
"""

from __future__ import annotations

import contextlib
import json
import uuid

import botocore.session
import pytest

from hsmbridge.protocol.operations import build_operations
from hsmbridge.protocol.validation import kms_model
from tests.output_shapes import output_validate

pytestmark = pytest.mark.softhsm

# Errors AWS's front end or every awsJson service may answer for any operation, although the KMS
# model lists none of them (AWS's list of common errors).
COMMON_ERRORS = frozenset(
    {
        "ValidationException",  # shape checks: length, range, pattern, enum, required
        "SerializationException",  # body is not JSON or a member has the wrong JSON type
        "AccessDeniedException",  # authorization; hsmbridge serves one account only
        "UnrecognizedClientException",  # unknown access key id
        "InvalidSignatureException",  # SigV4 mismatch
        "IncompleteSignatureException",  # malformed Authorization header
        "MissingAuthenticationTokenException",  # no Authorization header
        "ThrottlingException",  # rate limits (documented as 400 for KMS)
    }
)

# Deliberate divergences, each NOTE'd in the code that raises it.
DIVERGENCES = {
    # XKS stores are not implemented; KMS itself would accept EXTERNAL_KEY_STORE here.
    ("CreateCustomKeyStore", "UnsupportedOperationException"),
}


def _server_faults() -> frozenset[str]:
    """Error shapes the model flags `fault` (botocore's Shape.metadata drops the flag, the raw
    service description keeps it): hsmbridge sends exactly these as 5xx so SDKs retry them."""
    shapes = botocore.session.get_session().get_service_data("kms")["shapes"]
    return frozenset(name for name, shape in shapes.items() if shape.get("fault"))


# For custom key store keys these always fail (UnsupportedOperationException), as in KMS.
ROTATION = frozenset({"GetKeyRotationStatus", "EnableKeyRotation", "DisableKeyRotation"})
# Every key here is a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key, for which KMS answers these with
# InvalidKeyUsageException.
WRONG_KEY_USAGE = frozenset({"Sign", "Verify", "GenerateMac", "VerifyMac"})
NEVER_SUCCEED = ROTATION | WRONG_KEY_USAGE


def _implemented(shared) -> frozenset[str]:
    return frozenset(build_operations(shared.runtime.service))


def _tour(shared) -> None:
    """Every implemented operation once on its success path, through the recording client."""
    kms = shared.kms
    key = shared.create_key("contract")  # CreateKey
    kid = key["KeyId"]
    other = shared.create_key("contract-other")
    kms.describe_key(KeyId=kid)
    kms.list_keys(Limit=1)
    kms.describe_custom_key_stores()
    kms.describe_custom_key_stores(CustomKeyStoreId=shared.store_id)
    kms.connect_custom_key_store(CustomKeyStoreId=shared.store_id)  # no-op while CONNECTED
    kms.update_custom_key_store(CustomKeyStoreId=shared.store_id, NewCustomKeyStoreName="Tour")
    kms.update_custom_key_store(
        CustomKeyStoreId=shared.store_id, NewCustomKeyStoreName="SharedE2eStore"
    )
    kms.disable_key(KeyId=kid)
    kms.enable_key(KeyId=kid)
    kms.update_key_description(KeyId=kid, Description="toured")
    alias = f"alias/contract-{uuid.uuid4().hex[:10]}"
    kms.create_alias(AliasName=alias, TargetKeyId=kid)
    kms.update_alias(AliasName=alias, TargetKeyId=other["KeyId"])
    kms.list_aliases(KeyId=other["KeyId"])
    kms.list_aliases(Limit=1)
    kms.delete_alias(AliasName=alias)
    kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "a", "TagValue": "1"}])
    kms.list_resource_tags(KeyId=kid)
    kms.untag_resource(KeyId=kid, TagKeys=["a"])
    policy = kms.get_key_policy(KeyId=kid, PolicyName="default")["Policy"]
    kms.put_key_policy(KeyId=kid, PolicyName="default", Policy=policy)
    kms.list_key_policies(KeyId=kid)
    blob = kms.encrypt(KeyId=kid, Plaintext=b"tour", EncryptionContext={"k": "v"})
    blob = blob["CiphertextBlob"]
    kms.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})
    kms.re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext={"k": "v"}, DestinationKeyId=other["KeyId"]
    )
    kms.generate_data_key(KeyId=kid, KeySpec="AES_256")
    kms.generate_data_key_without_plaintext(KeyId=kid, NumberOfBytes=7)
    kms.generate_random(NumberOfBytes=3)
    kms.generate_random(NumberOfBytes=3, CustomKeyStoreId=shared.store_id)
    kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    kms.cancel_key_deletion(KeyId=kid)
    for call in (kms.get_key_rotation_status, kms.enable_key_rotation, kms.disable_key_rotation):
        # Recorded by the observer; the code is checked below.
        with contextlib.suppress(kms.exceptions.UnsupportedOperationException):
            call(KeyId=other["KeyId"])
    message = {"KeyId": other["KeyId"], "Message": b"tour"}
    mac = {**message, "MacAlgorithm": "HMAC_SHA_256"}
    signing = {**message, "SigningAlgorithm": "ECDSA_SHA_256"}
    for call, params in (
        (kms.sign, signing),
        (kms.verify, {**signing, "Signature": b"s"}),
        (kms.generate_mac, mac),
        (kms.verify_mac, {**mac, "Mac": b"m"}),
    ):
        with contextlib.suppress(kms.exceptions.InvalidKeyUsageException):
            call(**params)


@pytest.fixture(scope="module")
def toured(shared, observations):
    _tour(shared)
    return observations


def test_store_lifecycle_tour(fresh):
    """Create/Connect happened through boto3 in the fixture; Disconnect/Delete need a store of
    their own, because the shared one holds every other test's keys."""
    kms = fresh.kms
    fresh.disconnect()
    assert fresh.store_state() == "DISCONNECTED"
    deleted = kms.delete_custom_key_store(CustomKeyStoreId=fresh.store_id)
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 200
    # Gone for good: neither listed nor describable by id.
    listed = kms.describe_custom_key_stores()["CustomKeyStores"]
    assert fresh.store_id not in {s["CustomKeyStoreId"] for s in listed}
    with pytest.raises(kms.exceptions.CustomKeyStoreNotFoundException):
        kms.describe_custom_key_stores(CustomKeyStoreId=fresh.store_id)


def test_every_success_body_validates_against_the_output_shape(shared, toured):
    implemented = _implemented(shared)
    with toured.lock:
        responses = list(toured.responses)
    ok = {}
    for op, status, body in responses:
        if status == 200:
            problems = output_validate(op, json.loads(body))
            assert problems == [], (op, problems)
            ok[op] = ok.get(op, 0) + 1
    assert implemented - NEVER_SUCCEED - set(ok) == set(), "operations never seen succeeding"
    assert implemented >= NEVER_SUCCEED
    assert NEVER_SUCCEED & set(ok) == set(), "an operation that cannot succeed here did"


def test_every_error_code_is_listed_for_its_operation(shared, toured):
    implemented = _implemented(shared)
    model = kms_model()
    unexpected = []
    for op, code, _status in sorted(toured.error_pairs()):
        if op not in model.operation_names:
            continue  # unroutable requests ("Unknown"), tested in tests/api
        listed = {shape.name for shape in model.operation_model(op).error_shapes}
        allowed = listed | COMMON_ERRORS
        if op not in implemented:
            allowed |= {"UnsupportedOperationException"}  # named by app.py for any other op
        if code not in allowed and (op, code) not in DIVERGENCES:
            unexpected.append((op, code))
    assert unexpected == []


def test_error_status_follows_the_model_fault_flag(toured):
    faults = _server_faults()
    assert "KMSInternalException" in faults  # the flag is where we read it
    wrong = [
        (op, code, status)
        for op, code, status in sorted(toured.error_pairs())
        if (status >= 500) != (code in faults)
    ]
    assert wrong == []
