"""The key policy the AWS KMS console writes when a key is created there.

Owns: `console_key_policy`, statement for statement the console's document ("key-consolepolicy-3"):
the account root with kms:*, then key administrators, key users and external accounts when they
are given. Must not import anything above `errors`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from hsmbridge.policy.matching import ACCOUNT_ID, is_principal_arn, root_account

_ADMIN_ACTIONS: Final = (
    "kms:Create*",
    "kms:Describe*",
    "kms:Enable*",
    "kms:List*",
    "kms:Put*",
    "kms:Update*",
    "kms:Revoke*",
    "kms:Disable*",
    "kms:Get*",
    "kms:Delete*",
    "kms:TagResource",
    "kms:UntagResource",
)
_DELETE_ACTIONS: Final = ("kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion")
_USER_ACTIONS: Final = (
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncrypt*",
    "kms:GenerateDataKey*",
    "kms:DescribeKey",
)
_GRANT_ACTIONS: Final = ("kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant")


def _principal(arns: Sequence[str]) -> dict[str, Any]:
    return {"AWS": arns[0] if len(arns) == 1 else list(arns)}


def _check_arns(arns: Sequence[str], what: str) -> list[str]:
    checked: list[str] = []
    for arn in arns:
        is_arn = isinstance(arn, str) and is_principal_arn(arn) and not ACCOUNT_ID.match(arn)
        if is_arn and root_account(arn) is None:
            checked.append(arn)
            continue
        raise ValueError(
            f"{what}: {arn!r} is not an IAM user or role ARN "
            "(e.g. arn:aws:iam::111122223333:role/KeyAdmin)"
        )
    return checked


def _check_accounts(accounts: Sequence[str], own: str) -> list[str]:
    for account in accounts:
        if not isinstance(account, str) or not ACCOUNT_ID.match(account):
            raise ValueError(f"external account {account!r} is not a 12-digit AWS account id")
        if account == own:
            raise ValueError(
                f"external account {account} is the key's own account; add its users as key users"
            )
    return list(accounts)


def console_key_policy(
    partition: str,
    account_id: str,
    *,
    key_administrators: Sequence[str] = (),
    key_users: Sequence[str] = (),
    external_accounts: Sequence[str] = (),
    administrators_can_delete: bool = True,
) -> str:
    """The console's key policy for a key in `account_id`. Administrators and users are IAM
    user or role ARNs; external accounts are 12-digit ids. ValueError names a bad input."""
    if not partition.startswith("aws"):
        raise ValueError(f"partition {partition!r} is not an AWS partition (e.g. aws, aws-cn)")
    if not ACCOUNT_ID.match(account_id):
        raise ValueError(f"account id {account_id!r} is not a 12-digit AWS account id")
    admins = _check_arns(key_administrators, "key administrator")
    users = _check_arns(key_users, "key user")
    externals = [
        f"arn:{partition}:iam::{a}:root" for a in _check_accounts(external_accounts, account_id)
    ]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    ]
    if admins:
        actions = list(_ADMIN_ACTIONS)
        if administrators_can_delete:
            actions += _DELETE_ACTIONS
        statements.append(
            {
                "Sid": "Allow access for Key Administrators",
                "Effect": "Allow",
                "Principal": _principal(admins),
                "Action": actions,
                "Resource": "*",
            }
        )
    if users or externals:
        principals = users + externals
        statements.append(
            {
                "Sid": "Allow use of the key",
                "Effect": "Allow",
                "Principal": _principal(principals),
                "Action": list(_USER_ACTIONS),
                "Resource": "*",
            }
        )
        statements.append(
            {
                "Sid": "Allow attachment of persistent resources",
                "Effect": "Allow",
                "Principal": _principal(principals),
                "Action": list(_GRANT_ACTIONS),
                "Resource": "*",
                "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
            }
        )
    return json.dumps(
        {"Id": "key-consolepolicy-3", "Version": "2012-10-17", "Statement": statements}, indent=4
    )
