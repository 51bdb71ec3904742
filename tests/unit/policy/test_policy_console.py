"""The key policy the KMS console writes: exact documents, and refusals of bad inputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hsmbridge.policy.console import console_key_policy
from hsmbridge.policy.document import parse_key_policy

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/KeyAdmin"
ADMIN2 = f"arn:aws:iam::{ACCOUNT}:user/alice"
USER = f"arn:aws:iam::{ACCOUNT}:role/App"

ENABLE_IAM = {
    "Sid": "Enable IAM User Permissions",
    "Effect": "Allow",
    "Principal": {"AWS": ROOT},
    "Action": "kms:*",
    "Resource": "*",
}
ADMIN_ACTIONS = [
    "kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
    "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource",
    "kms:UntagResource",
]  # fmt: skip
USE_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
               "kms:DescribeKey"]  # fmt: skip
GRANT_ACTIONS = ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"]


def _doc(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Id": "key-consolepolicy-3", "Version": "2012-10-17", "Statement": list(statements)}


def _use(principal: Any) -> list[dict[str, Any]]:
    return [
        {"Sid": "Allow use of the key", "Effect": "Allow", "Principal": {"AWS": principal},
         "Action": USE_ACTIONS, "Resource": "*"},
        {"Sid": "Allow attachment of persistent resources", "Effect": "Allow",
         "Principal": {"AWS": principal}, "Action": GRANT_ACTIONS, "Resource": "*",
         "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}},
    ]  # fmt: skip


def test_no_administrators_or_users() -> None:
    text = console_key_policy("aws", ACCOUNT)
    assert json.loads(text) == _doc(ENABLE_IAM)
    assert list(json.loads(text)) == ["Id", "Version", "Statement"]


def test_one_administrator_is_a_single_string() -> None:
    assert json.loads(console_key_policy("aws", ACCOUNT, key_administrators=[ADMIN])) == _doc(
        ENABLE_IAM,
        {"Sid": "Allow access for Key Administrators", "Effect": "Allow",
         "Principal": {"AWS": ADMIN},
         "Action": [*ADMIN_ACTIONS, "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion"],
         "Resource": "*"},
    )  # fmt: skip


def test_administrators_without_deletion() -> None:
    doc = json.loads(
        console_key_policy(
            "aws", ACCOUNT, key_administrators=[ADMIN, ADMIN2], administrators_can_delete=False
        )
    )
    assert doc == _doc(
        ENABLE_IAM,
        {"Sid": "Allow access for Key Administrators", "Effect": "Allow",
         "Principal": {"AWS": [ADMIN, ADMIN2]}, "Action": ADMIN_ACTIONS, "Resource": "*"},
    )  # fmt: skip


def test_key_users_only() -> None:
    doc = json.loads(console_key_policy("aws", ACCOUNT, key_users=[USER]))
    assert doc == _doc(ENABLE_IAM, *_use(USER))


def test_external_account_only() -> None:
    doc = json.loads(console_key_policy("aws", ACCOUNT, external_accounts=["444455556666"]))
    assert doc == _doc(ENABLE_IAM, *_use("arn:aws:iam::444455556666:root"))


def test_everything_together() -> None:
    text = console_key_policy(
        "aws-cn", ACCOUNT, key_administrators=[ADMIN], key_users=[USER, ADMIN2],
        external_accounts=["444455556666", "777788889999"],
    )  # fmt: skip
    root = f"arn:aws-cn:iam::{ACCOUNT}:root"
    assert json.loads(text) == _doc(
        ENABLE_IAM | {"Principal": {"AWS": root}},
        {"Sid": "Allow access for Key Administrators", "Effect": "Allow",
         "Principal": {"AWS": ADMIN},
         "Action": [*ADMIN_ACTIONS, "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion"],
         "Resource": "*"},
        *_use([USER, ADMIN2, "arn:aws-cn:iam::444455556666:root",
               "arn:aws-cn:iam::777788889999:root"]),
    )  # fmt: skip
    # and it is a key policy KMS accepts
    assert len(parse_key_policy(text).statements) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"account_id": "1234"}, "account id '1234' is not a 12-digit AWS account id"),
        ({"partition": "gcp"}, "partition 'gcp' is not an AWS partition"),
        ({"key_administrators": ["alice"]},
         "key administrator: 'alice' is not an IAM user or role ARN"),
        ({"key_administrators": [ROOT]},
         f"key administrator: '{ROOT}' is not an IAM user or role ARN"),
        ({"key_users": ["444455556666"]},
         "key user: '444455556666' is not an IAM user or role ARN"),
        ({"key_users": ["arn:aws:iam::111122223333:group/devs"]},
         "key user: 'arn:aws:iam::111122223333:group/devs' is not an IAM user or role ARN"),
        ({"external_accounts": ["arn:aws:iam::444455556666:root"]},
         "external account 'arn:aws:iam::444455556666:root' is not a 12-digit AWS account id"),
        ({"external_accounts": [ACCOUNT]},
         f"external account {ACCOUNT} is the key's own account; add its users as key users"),
    ],
)  # fmt: skip
def test_refusals(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"partition": "aws", "account_id": ACCOUNT} | kwargs
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        console_key_policy(args.pop("partition"), args.pop("account_id"), **args)
