"""Identifier grammar: ids, ARNs, alias names, and how a `KeyId` member is parsed."""

from __future__ import annotations

import pytest

from hsmbridge import ids
from hsmbridge.errors import InvalidArnException, NotFoundException
from hsmbridge.ids import RefKind

KID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:us-east-2:111122223333:key/{KID}"
ALIAS_ARN = "arn:aws:kms:us-east-2:111122223333:alias/ExampleAlias"


def test_generated_ids_have_the_kms_shapes() -> None:
    store_ids = {ids.new_custom_key_store_id() for _ in range(200)}
    assert len(store_ids) == 200
    assert all(ids.STORE_ID_RE.match(s) for s in store_ids)  # cks- + 17 hex
    key_ids = {ids.new_key_id() for _ in range(200)}
    assert len(key_ids) == 200
    assert all(ids.is_key_id(k) for k in key_ids)


def test_arn_formatting() -> None:
    assert ids.key_arn("aws", "us-east-2", "111122223333", KID) == KEY_ARN
    assert ids.alias_arn("aws", "us-east-2", "111122223333", "alias/ExampleAlias") == ALIAS_ARN
    assert ids.key_arn("aws-cn", "cn-north-1", "111122223333", KID).startswith("arn:aws-cn:kms:")


# (text, allow_alias, expected kind, value, region, account)
GOOD_REFS = [
    (KID, True, RefKind.KEY_ID, KID, None, None),
    (KID, False, RefKind.KEY_ID, KID, None, None),
    (KEY_ARN, False, RefKind.KEY_ARN, KID, "us-east-2", "111122223333"),
    ("alias/ExampleAlias", True, RefKind.ALIAS_NAME, "alias/ExampleAlias", None, None),
    (ALIAS_ARN, True, RefKind.ALIAS_ARN, "alias/ExampleAlias", "us-east-2", "111122223333"),
    ("not-a-key-id", False, RefKind.KEY_ID, "not-a-key-id", None, None),  # NotFound later
]


@pytest.mark.parametrize("case", GOOD_REFS, ids=[f"{c[2].name}-{c[1]}" for c in GOOD_REFS])
def test_parse_key_ref(case: tuple) -> None:
    text, allow, kind, value, region, account = case
    ref = ids.parse_key_ref(text, allow_alias=allow)
    assert (ref.kind, ref.value, ref.region, ref.account) == (kind, value, region, account)
    assert ref.is_alias is (kind in (RefKind.ALIAS_NAME, RefKind.ALIAS_ARN))


@pytest.mark.parametrize(
    ("text", "allow", "error"),
    [
        ("alias/ExampleAlias", False, NotFoundException),
        (ALIAS_ARN, False, NotFoundException),
        ("arn:aws:kms:us-east-2:1111:key/" + KID, True, InvalidArnException),  # short account
        ("arn:aws:s3:::bucket", True, InvalidArnException),
        ("arn:aws:kms:us-east-2:111122223333:grant/x", True, InvalidArnException),
    ],
)
def test_parse_key_ref_refusals(text: str, allow: bool, error: type[Exception]) -> None:
    with pytest.raises(error):
        ids.parse_key_ref(text, allow_alias=allow)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (KID, True),
        (KID.upper(), False),  # KMS key ids are lower-case hex
        (KID[:-1], False),
        (KID.replace("-", ""), False),
        ("", False),
    ],
)
def test_is_key_id(text: str, ok: bool) -> None:
    assert ids.is_key_id(text) is ok


def test_parse_kms_arn() -> None:
    key = ids.parse_kms_arn(KEY_ARN)
    assert key is not None
    assert (key.partition, key.region, key.account, key.kind, key.resource) == (
        "aws", "us-east-2", "111122223333", "key", KID,
    )  # fmt: skip
    alias = ids.parse_kms_arn(ALIAS_ARN)
    assert alias is not None
    assert (alias.kind, alias.resource) == ("alias", "alias/ExampleAlias")
    assert ids.parse_kms_arn("arn:aws:iam::111122223333:user/x") is None


@pytest.mark.parametrize(
    ("cluster_id", "ok"),
    [
        ("cluster-1a23b4cdefg", False),  # AWS's docs' example uses 1, which the pattern excludes
        ("cluster-abcdefghijk", True),
        ("cluster-234567abcdefghij", True),
        ("cluster-abcdefghij", False),  # 10 characters: too short
        ("cluster-abcdefghijklmnopq", False),  # 17: too long
    ],
)
def test_cluster_id_pattern(cluster_id: str, ok: bool) -> None:
    assert (ids.CLUSTER_ID_RE.match(cluster_id) is not None) is ok
