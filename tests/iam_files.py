"""Writing `iam/ACCOUNT.json` files for tests, in the shape that
`aws iam get-account-authorization-details` prints, and credentials files with principals of
several accounts.

`Iam` collects users, roles and managed policies of one account and writes them; documents are
stored the way the real API returns them (URL-encoded JSON strings) when `encoded=True`, so both
forms stay exercised.
"""

from __future__ import annotations

import json
import secrets
import string
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALLOW_ALL: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def _id(prefix: str) -> str:
    return prefix + "".join(
        secrets.choice(string.ascii_uppercase + string.digits) for _ in range(17)
    )


def statement(effect: str, action: Any, resource: Any = "*", **extra: Any) -> dict[str, Any]:
    return {"Effect": effect, "Action": action, "Resource": resource, **extra}


def document(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


@dataclass
class Iam:
    account: str
    encoded: bool = False
    users: list[dict[str, Any]] = field(default_factory=list)
    roles: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)

    def _doc(self, doc: dict[str, Any]) -> Any:
        return urllib.parse.quote(json.dumps(doc)) if self.encoded else doc

    def user(
        self,
        name: str,
        *inline: dict[str, Any],
        managed: tuple[str, ...] = (),
        groups: tuple[str, ...] = (),
    ) -> str:
        arn = f"arn:aws:iam::{self.account}:user/{name}"
        self.users.append(
            {
                "Path": "/",
                "UserName": name,
                "UserId": _id("AIDA"),
                "Arn": arn,
                "UserPolicyList": [
                    {"PolicyName": f"{name}-inline-{i}", "PolicyDocument": self._doc(d)}
                    for i, d in enumerate(inline)
                ],
                "GroupList": list(groups),
                "AttachedManagedPolicies": [
                    {"PolicyName": m.rsplit("/", 1)[-1], "PolicyArn": m} for m in managed
                ],
            }
        )
        return arn

    def role(self, name: str, trust: dict[str, Any], *inline: dict[str, Any]) -> str:
        arn = f"arn:aws:iam::{self.account}:role/{name}"
        self.roles.append(
            {
                "Path": "/",
                "RoleName": name,
                "RoleId": _id("AROA"),
                "Arn": arn,
                "AssumeRolePolicyDocument": self._doc(trust),
                "RolePolicyList": [
                    {"PolicyName": f"{name}-inline-{i}", "PolicyDocument": self._doc(d)}
                    for i, d in enumerate(inline)
                ],
                "AttachedManagedPolicies": [],
            }
        )
        return arn

    def managed(self, name: str, doc: dict[str, Any]) -> str:
        arn = f"arn:aws:iam::{self.account}:policy/{name}"
        self.policies.append(
            {
                "PolicyName": name,
                "PolicyId": _id("ANPA"),
                "Arn": arn,
                "Path": "/",
                "DefaultVersionId": "v1",
                "PolicyVersionList": [
                    {"Document": self._doc(doc), "VersionId": "v1", "IsDefaultVersion": True}
                ],
            }
        )
        return arn

    def write(self, iam_dir: Path) -> Path:
        iam_dir.mkdir(parents=True, exist_ok=True)
        path = iam_dir / f"{self.account}.json"
        body = {
            "UserDetailList": self.users,
            "GroupDetailList": self.groups,
            "RoleDetailList": self.roles,
            "Policies": self.policies,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(path)  # atomic: a reloading server never reads half a file
        return path


@dataclass(frozen=True)
class Keys:
    """One credentials-file section."""

    section: str
    access_key_id: str
    secret: str
    principal_arn: str
    via_service: str | None = None


def new_keys(section: str, principal_arn: str, via_service: str | None = None) -> Keys:
    return Keys(
        section,
        "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        secrets.token_urlsafe(30)[:40],
        principal_arn,
        via_service,
    )


def write_credentials(path: Path, *keys: Keys) -> Path:
    lines = []
    for k in keys:
        lines += [
            f"[{k.section}]",
            f"aws_access_key_id = {k.access_key_id}",
            f"aws_secret_access_key = {k.secret}",
            f"principal_arn = {k.principal_arn}",
        ]
        if k.via_service:
            lines.append(f"via_service = {k.via_service}")
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path
