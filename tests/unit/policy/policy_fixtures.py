"""Accounts, principals and documents the policy tests share (not a test module)."""

from __future__ import annotations

import json
from typing import Any

from hsmbridge.policy.document import (
    PolicyDocument,
    parse_identity_policy,
    parse_key_policy,
    parse_trust_policy,
)
from hsmbridge.policy.evaluation import ConditionValue, RequestFacts

OWN = "111122223333"  # the key's account
EXT = "444455556666"  # another account
KEY = f"arn:aws:kms:us-east-1:{OWN}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-east-1:{OWN}:key/0987dcba-09fe-87dc-65ba-ab0987654321"
ROLE_APP = f"arn:aws:iam::{OWN}:role/app"
ROLE_OPS = f"arn:aws:iam::{OWN}:role/ops"
EXT_ROLE = f"arn:aws:iam::{EXT}:role/ExampleRole"


def facts(
    caller: str, action: str, resource: str = KEY, keys: dict[str, ConditionValue] | None = None
) -> RequestFacts:
    arn, account, kind, role = CALLERS[caller]
    return RequestFacts(action, resource, arn, account, kind, role, keys or {})


# name -> (principal ARN, account, aws:PrincipalType, role of the session)
CALLERS: dict[str, tuple[str, str, str, str | None]] = {
    "root": (f"arn:aws:iam::{OWN}:root", OWN, "Account", None),
    "alice": (f"arn:aws:iam::{OWN}:user/alice", OWN, "User", None),
    "bob": (f"arn:aws:iam::{OWN}:user/bob", OWN, "User", None),
    "dave": (f"arn:aws:iam::{OWN}:user/dave", OWN, "User", None),
    "session": (f"arn:aws:sts::{OWN}:assumed-role/app/s1", OWN, "AssumedRole", ROLE_APP),
    "session2": (f"arn:aws:sts::{OWN}:assumed-role/app/s2", OWN, "AssumedRole", ROLE_APP),
    "ops": (f"arn:aws:sts::{OWN}:assumed-role/ops/s1", OWN, "AssumedRole", ROLE_OPS),
    "carol": (f"arn:aws:iam::{EXT}:user/carol", EXT, "User", None),
    "erin": (f"arn:aws:iam::{EXT}:user/erin", EXT, "User", None),
    "ext_root": (f"arn:aws:iam::{EXT}:root", EXT, "Account", None),
    "ext_session": (
        f"arn:aws:sts::{EXT}:assumed-role/ExampleRole/bob-session",
        EXT,
        "AssumedRole",
        EXT_ROLE,
    ),
    "cloudtrail": ("cloudtrail.amazonaws.com", "", "AWSService", None),
    "s3": ("s3.amazonaws.com", "", "AWSService", None),
}


def stmt(effect: str, principal: Any, action: Any, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"Effect": effect}
    if principal is not None:
        out["Principal"] = principal
    out["Action"] = action
    out.update(extra)
    return out


def aws(*arns: str) -> dict[str, Any]:
    return {"AWS": arns[0] if len(arns) == 1 else list(arns)}


def key_policy(*statements: dict[str, Any]) -> PolicyDocument:
    body = [dict(s, Resource=s.get("Resource", "*")) for s in statements]
    return parse_key_policy(json.dumps({"Version": "2012-10-17", "Statement": body}))


def iam(*statements: dict[str, Any]) -> PolicyDocument:
    return parse_identity_policy({"Version": "2012-10-17", "Statement": list(statements)})


def trust(*statements: dict[str, Any]) -> PolicyDocument:
    return parse_trust_policy({"Version": "2012-10-17", "Statement": list(statements)})


def allow(action: Any, resource: Any = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def deny(action: Any, resource: Any = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": resource, **extra}


OWN_ROOT = stmt(
    "Allow", aws(f"arn:aws:iam::{OWN}:root"), "kms:*", Sid="Enable IAM User Permissions"
)
