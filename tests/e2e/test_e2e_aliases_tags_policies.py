"""Aliases, tags and key policies through boto3 against the real server."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.e2e_support import expect_error

pytestmark = pytest.mark.softhsm

UNKNOWN_KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _name(prefix: str = "e2e") -> str:
    # Alias names are unique per account; the shared server outlives a single test.
    return f"alias/{prefix}-{uuid.uuid4().hex[:12]}"


def _aliases_of(kms, key_id):
    pages = kms.get_paginator("list_aliases").paginate(KeyId=key_id)
    return {a["AliasName"]: a for page in pages for a in page["Aliases"]}


def test_alias_lifecycle(shared, kms, key):
    other = shared.create_key("other")
    name = _name()
    kms.create_alias(AliasName=name, TargetKeyId=key["Arn"])  # key ARN accepted as target
    entry = _aliases_of(kms, key["KeyId"])[name]
    assert entry["TargetKeyId"] == key["KeyId"]
    assert entry["AliasArn"] == f"arn:aws:kms:us-east-1:111122223333:{name}"
    assert entry["CreationDate"] == entry["LastUpdatedDate"]

    expect_error(
        "AlreadyExistsException", lambda: kms.create_alias(AliasName=name, TargetKeyId=key["KeyId"])
    )
    kms.update_alias(AliasName=name, TargetKeyId=other["KeyId"])
    assert name not in _aliases_of(kms, key["KeyId"])
    assert _aliases_of(kms, other["KeyId"])[name]["TargetKeyId"] == other["KeyId"]
    assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == other["KeyId"]

    kms.delete_alias(AliasName=name)
    assert name not in _aliases_of(kms, other["KeyId"])
    assert kms.describe_key(KeyId=other["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    expect_error("NotFoundException", lambda: kms.delete_alias(AliasName=name))
    expect_error(
        "NotFoundException", lambda: kms.update_alias(AliasName=name, TargetKeyId=key["KeyId"])
    )


def test_alias_errors(kms, lax, key):
    kid = key["KeyId"]
    expect_error(
        "InvalidAliasNameException",
        lambda: kms.create_alias(AliasName="alias/aws/e2e", TargetKeyId=kid),
    )
    expect_error(
        "InvalidAliasNameException",
        lambda: kms.create_alias(AliasName="e2e-no-prefix", TargetKeyId=kid),
    )
    expect_error(
        "ValidationException",
        lambda: lax.create_alias(AliasName="alias/has space", TargetKeyId=kid),
    )
    expect_error(
        "NotFoundException", lambda: kms.create_alias(AliasName=_name(), TargetKeyId=UNKNOWN_KEY)
    )
    # CreateAlias's target takes a key ID or ARN, not another alias.
    name = _name()
    kms.create_alias(AliasName=name, TargetKeyId=kid)
    expect_error("NotFoundException", lambda: kms.create_alias(AliasName=_name(), TargetKeyId=name))
    kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    expect_error(
        "KMSInvalidStateException", lambda: kms.create_alias(AliasName=_name(), TargetKeyId=kid)
    )
    kms.delete_alias(AliasName=name)  # allowed on a key pending deletion


def test_alias_names_outside_create_are_not_invalid_alias_errors(kms, key):
    # UpdateAlias and DeleteAlias do not list InvalidAliasNameException in the KMS model; a name
    # that cannot exist is simply not found there.
    for bad in ("alias/aws/e2e", "e2e-no-prefix"):
        expect_error("NotFoundException", lambda bad=bad: kms.delete_alias(AliasName=bad))
        expect_error(
            "NotFoundException",
            lambda bad=bad: kms.update_alias(AliasName=bad, TargetKeyId=key["KeyId"]),
        )


def test_list_aliases_paginates_and_filters(shared, kms, lax, key):
    names = sorted(_name("page") for _ in range(3))
    for name in names:
        kms.create_alias(AliasName=name, TargetKeyId=key["KeyId"])
    pages = list(
        kms.get_paginator("list_aliases").paginate(
            KeyId=key["KeyId"], PaginationConfig={"PageSize": 2}
        )
    )
    assert [len(p["Aliases"]) for p in pages] == [2, 1]
    assert sorted(a["AliasName"] for p in pages for a in p["Aliases"]) == names
    everything = {
        a["AliasName"] for p in kms.get_paginator("list_aliases").paginate() for a in p["Aliases"]
    }
    assert set(names) <= everything
    expect_error("NotFoundException", lambda: kms.list_aliases(KeyId=UNKNOWN_KEY))
    expect_error("InvalidMarkerException", lambda: kms.list_aliases(Marker="garbage"))
    expect_error("ValidationException", lambda: lax.list_aliases(Limit=0))


@pytest.mark.slow
def test_fifty_first_alias_is_over_the_quota(kms, key):
    for _ in range(50):
        kms.create_alias(AliasName=_name("quota"), TargetKeyId=key["KeyId"])
    expect_error(
        "LimitExceededException",
        lambda: kms.create_alias(AliasName=_name("quota"), TargetKeyId=key["KeyId"]),
    )


def _tags(kms, key_id):
    pages = kms.get_paginator("list_resource_tags").paginate(KeyId=key_id)
    return {t["TagKey"]: t["TagValue"] for p in pages for t in p["Tags"]}


def test_tags(kms, key):
    kid = key["KeyId"]
    kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "team", "TagValue": "a"}])
    kms.tag_resource(
        KeyId=key["Arn"],
        Tags=[{"TagKey": "team", "TagValue": "b"}, {"TagKey": "empty", "TagValue": ""}],
    )
    assert _tags(kms, kid) == {"team": "b", "empty": ""}  # re-tagging overwrites
    kms.untag_resource(KeyId=kid, TagKeys=["team", "never-there"])  # unknown keys are ignored
    assert _tags(kms, kid) == {"empty": ""}

    many = [{"TagKey": f"k{i:02d}", "TagValue": str(i)} for i in range(49)]
    kms.tag_resource(KeyId=kid, Tags=many)  # 50 in all: the quota
    first = kms.list_resource_tags(KeyId=kid, Limit=20)
    assert len(first["Tags"]) == 20
    assert first["Truncated"]
    assert len(_tags(kms, kid)) == 50
    expect_error(
        "TagException",
        lambda: kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "k-51", "TagValue": "x"}]),
    )
    expect_error(
        "TagException",
        lambda: kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "aws:owner", "TagValue": "x"}]),
    )
    expect_error(
        "NotFoundException",
        lambda: kms.tag_resource(KeyId=UNKNOWN_KEY, Tags=[{"TagKey": "a", "TagValue": "b"}]),
    )
    expect_error("NotFoundException", lambda: kms.list_resource_tags(KeyId=UNKNOWN_KEY))
    # A marker that cannot be a tag key (1-128 characters) was never returned.
    expect_error(
        "InvalidMarkerException", lambda: kms.list_resource_tags(KeyId=kid, Marker="z" * 129)
    )


def test_tags_refused_while_pending_deletion(kms, key):
    kid = key["KeyId"]
    kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    expect_error(
        "KMSInvalidStateException",
        lambda: kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "a", "TagValue": "b"}]),
    )
    expect_error("KMSInvalidStateException", lambda: kms.untag_resource(KeyId=kid, TagKeys=["a"]))
    assert kms.list_resource_tags(KeyId=kid)["Tags"] == []  # reading is still allowed


def test_key_policies(kms, lax, key):
    kid = key["KeyId"]
    assert kms.list_key_policies(KeyId=kid)["PolicyNames"] == ["default"]
    got = kms.get_key_policy(KeyId=kid)  # PolicyName defaults to "default"
    assert got["PolicyName"] == "default"
    doc = json.loads(got["Policy"])
    assert doc["Statement"][0]["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}

    policy = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "e2e",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:user/tester"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )
    kms.put_key_policy(KeyId=kid, PolicyName="default", Policy=policy)
    assert kms.get_key_policy(KeyId=kid, PolicyName="default")["Policy"] == policy

    expect_error(
        "MalformedPolicyDocumentException",
        lambda: kms.put_key_policy(KeyId=kid, PolicyName="default", Policy="{not json"),
    )
    padded = policy[:-1] + ', "Pad": "' + "x" * (32 * 1024) + '"}'
    expect_error(
        "LimitExceededException",
        lambda: kms.put_key_policy(KeyId=kid, PolicyName="default", Policy=padded),
    )
    assert kms.get_key_policy(KeyId=kid)["Policy"] == policy  # failed puts changed nothing
    expect_error("NotFoundException", lambda: kms.get_key_policy(KeyId=kid, PolicyName="AWS_RAM"))
    expect_error(
        "ValidationException",
        lambda: kms.put_key_policy(KeyId=kid, PolicyName="AWS_RAM", Policy=policy),
    )
    expect_error("NotFoundException", lambda: kms.get_key_policy(KeyId=UNKNOWN_KEY))
    expect_error("NotFoundException", lambda: kms.list_key_policies(KeyId=UNKNOWN_KEY))
    expect_error("ValidationException", lambda: lax.list_key_policies(KeyId=kid, Limit=0))
