"""Key lifecycle operations through boto3 against the real server and a SoftHSM token:
CreateKey, DescribeKey (all four identifier forms), ListKeys, Enable/DisableKey,
Schedule/CancelKeyDeletion, UpdateKeyDescription, the rotation operations and an operation
hsmbridge does not implement."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.e2e_support import expect_error

pytestmark = pytest.mark.softhsm

UNKNOWN_KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _alias(prefix: str) -> str:
    """An alias name no other test (or earlier run) on the session-wide server uses."""
    return f"alias/{prefix}-{uuid.uuid4().hex[:12]}"


def test_create_key_metadata(shared):
    meta = shared.create_key("first key")
    assert meta["Origin"] == "AWS_CLOUDHSM"
    assert meta["CustomKeyStoreId"] == shared.store_id
    assert meta["CloudHsmClusterId"] == shared.env.cluster_id
    assert meta["KeyState"] == "Enabled"
    assert meta["Enabled"] is True
    assert meta["Description"] == "first key"
    assert meta["KeyManager"] == "CUSTOMER"
    assert meta["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert meta["Arn"] == f"arn:aws:kms:us-east-1:111122223333:key/{meta['KeyId']}"
    # The material is in the token, labelled with the key ARN.
    backend = shared.runtime.service.ctx.connections.peek(shared.store_id)
    assert [k.label for k in backend.find_keys(meta["Arn"])] == [meta["Arn"]]


def test_create_key_errors(shared, kms):
    expect_error(
        "CustomKeyStoreNotFoundException",
        lambda: kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId="cks-00000000000000000"),
    )
    # hsmbridge only makes keys in a custom key store.
    expect_error("UnsupportedOperationException", kms.create_key)
    expect_error(
        "UnsupportedOperationException",
        lambda: kms.create_key(
            Origin="AWS_CLOUDHSM", CustomKeyStoreId=shared.store_id, KeySpec="RSA_2048"
        ),
    )
    expect_error(
        "MalformedPolicyDocumentException",
        lambda: kms.create_key(
            Origin="AWS_CLOUDHSM", CustomKeyStoreId=shared.store_id, Policy="{not json"
        ),
    )
    expect_error(
        "TagException",
        lambda: kms.create_key(
            Origin="AWS_CLOUDHSM",
            CustomKeyStoreId=shared.store_id,
            Tags=[{"TagKey": "aws:reserved", "TagValue": "x"}],
        ),
    )


def test_describe_key_by_every_identifier(kms, key):
    alias = _alias("e2e-describe")
    kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    alias_arn = f"arn:aws:kms:us-east-1:111122223333:{alias}"
    for ref in (key["KeyId"], key["Arn"], alias, alias_arn):
        assert kms.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == key["KeyId"], ref


def test_describe_key_errors(kms, lax):
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId=UNKNOWN_KEY))
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId=_alias("e2e-no-such")))
    expect_error("InvalidArnException", lambda: kms.describe_key(KeyId="arn:aws:kms:broken"))
    # Another account's key is not served by this endpoint.
    other = f"arn:aws:kms:us-east-1:999988887777:key/{UNKNOWN_KEY}"
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId=other))
    expect_error("ValidationException", lambda: lax.describe_key(KeyId=""))


def test_list_keys_paginates(shared, kms, lax):
    mine = {shared.create_key("list")["KeyId"] for _ in range(3)}
    pages = list(kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2}))
    assert len(pages) >= 2
    assert all(len(page["Keys"]) <= 2 for page in pages)
    assert all(page["Truncated"] for page in pages[:-1])
    assert pages[-1]["Truncated"] is False
    listed = [entry["KeyId"] for page in pages for entry in page["Keys"]]
    assert len(listed) == len(set(listed)), "a key was listed twice across pages"
    assert mine <= set(listed)
    entry = next(e for page in pages for e in page["Keys"] if e["KeyId"] in mine)
    assert entry["KeyArn"].endswith(f":key/{entry['KeyId']}")
    expect_error("InvalidMarkerException", lambda: kms.list_keys(Marker="not-a-marker"))
    expect_error("ValidationException", lambda: lax.list_keys(Limit=0))


def test_enable_disable(kms, key):
    kid = key["KeyId"]
    kms.disable_key(KeyId=kid)
    meta = kms.describe_key(KeyId=kid)["KeyMetadata"]
    assert (meta["KeyState"], meta["Enabled"]) == ("Disabled", False)
    kms.disable_key(KeyId=kid)  # idempotent, as in KMS
    kms.enable_key(KeyId=key["Arn"])  # management operations take the key ARN too
    assert kms.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Enabled"
    expect_error("NotFoundException", lambda: kms.enable_key(KeyId=UNKNOWN_KEY))
    expect_error("NotFoundException", lambda: kms.disable_key(KeyId=UNKNOWN_KEY))
    # Management operations do not accept aliases.
    alias = _alias("e2e-enable")
    kms.create_alias(AliasName=alias, TargetKeyId=kid)
    expect_error("NotFoundException", lambda: kms.disable_key(KeyId=alias))


def test_schedule_and_cancel_deletion(shared, kms, key):
    kid = key["KeyId"]
    now = shared.env.clock()
    out = kms.schedule_key_deletion(KeyId=kid)
    assert out["KeyId"] == key["Arn"]
    assert out["KeyState"] == "PendingDeletion"
    assert out["PendingWindowInDays"] == 30  # the default
    assert out["DeletionDate"].timestamp() == pytest.approx(now + 30 * 86400)
    meta = kms.describe_key(KeyId=kid)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    assert meta["DeletionDate"] == out["DeletionDate"]
    expect_error("KMSInvalidStateException", lambda: kms.schedule_key_deletion(KeyId=kid))
    expect_error("KMSInvalidStateException", lambda: kms.enable_key(KeyId=kid))
    expect_error("KMSInvalidStateException", lambda: kms.disable_key(KeyId=kid))
    expect_error(
        "KMSInvalidStateException", lambda: kms.update_key_description(KeyId=kid, Description="x")
    )

    assert kms.cancel_key_deletion(KeyId=kid)["KeyId"] == key["Arn"]
    meta = kms.describe_key(KeyId=kid)["KeyMetadata"]
    assert meta["KeyState"] == "Disabled"  # not Enabled
    assert "DeletionDate" not in meta
    expect_error("KMSInvalidStateException", lambda: kms.cancel_key_deletion(KeyId=kid))
    expect_error("NotFoundException", lambda: kms.cancel_key_deletion(KeyId=UNKNOWN_KEY))


@pytest.mark.parametrize(("days", "ok"), [(6, False), (7, True), (30, True), (31, False)])
def test_pending_window_bounds(kms, key, days, ok):
    def call():
        return kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=days)

    if ok:
        assert call()["PendingWindowInDays"] == days
    else:
        expect_error("ValidationException", call)
        assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"


def test_update_key_description(kms, lax, key):
    kms.update_key_description(KeyId=key["KeyId"], Description="renamed")
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Description"] == "renamed"
    kms.update_key_description(KeyId=key["KeyId"], Description="")
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Description"] == ""
    expect_error(
        "ValidationException",
        lambda: lax.update_key_description(KeyId=key["KeyId"], Description="d" * 8193),
    )
    expect_error(
        "NotFoundException",
        lambda: kms.update_key_description(KeyId=UNKNOWN_KEY, Description="x"),
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda kms, kid: kms.get_key_rotation_status(KeyId=kid),
        lambda kms, kid: kms.enable_key_rotation(KeyId=kid),
        lambda kms, kid: kms.disable_key_rotation(KeyId=kid),
    ],
    ids=["GetKeyRotationStatus", "EnableKeyRotation", "DisableKeyRotation"],
)
def test_rotation_is_unsupported_for_custom_key_store_keys(kms, key, call):
    message = expect_error("UnsupportedOperationException", lambda: call(kms, key["KeyId"]))
    assert key["Arn"] in message
    expect_error("NotFoundException", lambda: call(kms, UNKNOWN_KEY))


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        (
            "GenerateDataKeyPair",
            lambda kms: kms.generate_data_key_pair(KeyId=UNKNOWN_KEY, KeyPairSpec="RSA_2048"),
        ),
        (
            "GetPublicKey",
            lambda kms: kms.get_public_key(KeyId=UNKNOWN_KEY),
        ),
    ],
)
def test_unimplemented_operation_is_named(kms, operation, call):
    message = expect_error("UnsupportedOperationException", lambda: call(kms))
    assert operation in message
