"""IamDirectory: authorization-details files per account, their policies, and live reloading."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hsmbridge.errors import ConfigError
from hsmbridge.identity.iam import IamDirectory, write_demo_iam
from hsmbridge.policy.document import parse_identity_policy, parse_trust_policy

ACCOUNT = "111122223333"
OTHER = "444455556666"
ARN = f"arn:aws:iam::{ACCOUNT}"


def _doc(action: str | list[str], effect: str = "Allow") -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": effect, "Action": action, "Resource": "*"}],
    }


def _encoded(doc: dict[str, Any]) -> str:
    """A document as the IAM API returns it: URL-encoded JSON (RFC 3986)."""
    return urllib.parse.quote(json.dumps(doc), safe="")


KMS_USE_V1 = _doc("kms:*")
KMS_USE_V2 = _doc(["kms:Decrypt", "kms:Encrypt"])
READ_ONLY = _doc(["kms:Describe*", "kms:List*"])
ADMINS_INLINE = _doc("kms:Create*")
ALICE_INLINE = _doc("kms:GenerateDataKey")
ROLE_INLINE = _doc("kms:Sign")
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}
APP_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"{ARN}:root"}, "Action": "sts:AssumeRole"}
    ],
}


def export() -> dict[str, Any]:
    """A realistic `aws iam get-account-authorization-details` output (fields it prints that
    hsmbridge ignores included); a fresh copy each call."""
    return copy.deepcopy(_EXPORT)


_EXPORT: dict[str, Any] = {
    "UserDetailList": [
        {
            "Path": "/",
            "UserName": "alice",
            "UserId": "AIDAEXAMPLEALICE00001",
            "Arn": f"{ARN}:user/alice",
            "CreateDate": "2019-12-02T18:00:00+00:00",
            "UserPolicyList": [{"PolicyName": "AllowKms", "PolicyDocument": ALICE_INLINE}],
            "GroupList": ["Admins", "Devs"],
            "AttachedManagedPolicies": [
                {"PolicyName": "KmsUse", "PolicyArn": f"{ARN}:policy/KmsUse"}
            ],
            "Tags": [],
        },
        {  # no optional lists at all, and a path
            "Path": "/eng/",
            "UserName": "bob",
            "UserId": "AIDAEXAMPLEBOB0000001",
            "Arn": f"{ARN}:user/eng/bob",
        },
    ],
    "GroupDetailList": [
        {
            "Path": "/",
            "GroupName": "Admins",
            "GroupId": "AGPAEXAMPLEADMINS0001",
            "Arn": f"{ARN}:group/Admins",
            "GroupPolicyList": [
                {"PolicyName": "AdminsInline", "PolicyDocument": _encoded(ADMINS_INLINE)}
            ],
            "AttachedManagedPolicies": [
                {"PolicyName": "KmsUse", "PolicyArn": f"{ARN}:policy/KmsUse"}
            ],
        },
        {
            "Path": "/",
            "GroupName": "Devs",
            "GroupId": "AGPAEXAMPLEDEVS000001",
            "Arn": f"{ARN}:group/Devs",
            "GroupPolicyList": [],
            "AttachedManagedPolicies": [
                {
                    "PolicyName": "ReadOnlyAccess",
                    "PolicyArn": "arn:aws:iam::aws:policy/ReadOnlyAccess",
                }
            ],
        },
    ],
    "RoleDetailList": [
        {
            "Path": "/service-role/",
            "RoleName": "Ec2Role",
            "RoleId": "AROAEXAMPLEEC2ROLE001",
            "Arn": f"{ARN}:role/service-role/Ec2Role",
            "CreateDate": "2014-07-30T17:09:20+00:00",
            "AssumeRolePolicyDocument": EC2_TRUST,
            "InstanceProfileList": [],
            "RolePolicyList": [{"PolicyName": "Sign", "PolicyDocument": ROLE_INLINE}],
            "AttachedManagedPolicies": [
                {
                    "PolicyName": "AdministratorAccess",
                    "PolicyArn": "arn:aws:iam::aws:policy/AdministratorAccess",
                }
            ],
            "Tags": [],
            "RoleLastUsed": {},
        },
        {
            "Path": "/",
            "RoleName": "App",
            "RoleId": "AROAEXAMPLEAPPROLE001",
            "Arn": f"{ARN}:role/App",
            "AssumeRolePolicyDocument": _encoded(APP_TRUST),
            "MaxSessionDuration": 7200,
        },
    ],
    "Policies": [
        {
            "PolicyName": "KmsUse",
            "PolicyId": "ANPAEXAMPLEKMSUSE0001",
            "Arn": f"{ARN}:policy/KmsUse",
            "Path": "/",
            "DefaultVersionId": "v2",
            "AttachmentCount": 2,
            "IsAttachable": True,
            "PolicyVersionList": [
                {"Document": KMS_USE_V1, "VersionId": "v1", "IsDefaultVersion": False},
                {"Document": _encoded(KMS_USE_V2), "VersionId": "v2", "IsDefaultVersion": True},
            ],
        },
        {
            "PolicyName": "ReadOnlyAccess",
            "PolicyId": "ANPAEXAMPLEREADONLY01",
            "Arn": "arn:aws:iam::aws:policy/ReadOnlyAccess",
            "Path": "/",
            "DefaultVersionId": "v7",
            "PolicyVersionList": [
                {"Document": READ_ONLY, "VersionId": "v7", "IsDefaultVersion": True}
            ],
        },
    ],
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(directory: Path, account: str, doc: Any, *, mtime_ns: int | None = None) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{account}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    if mtime_ns is not None:  # a distinct stamp even on coarse-timestamp filesystems
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


@pytest.fixture
def iam_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "iam", ACCOUNT, export())
    return tmp_path / "iam"


def _labels(policies: tuple[Any, ...]) -> list[str]:
    return [p.label for p in policies]


# --- loading ------------------------------------------------------------------------------------


def test_realistic_export(iam_dir: Path) -> None:
    iam = IamDirectory(iam_dir)
    alice = iam.user(f"{ARN}:user/alice")
    assert alice is not None
    assert (alice.name, alice.user_id, alice.account_id) == (
        "alice", "AIDAEXAMPLEALICE00001", ACCOUNT,
    )  # fmt: skip
    # Own inline, own attached, then each group's inline and attached; KmsUse (attached to alice
    # and to Admins) once.
    assert _labels(alice.policies) == [
        "inline policy AllowKms of user/alice",
        f"{ARN}:policy/KmsUse",
        "inline policy AdminsInline of group/Admins",
        "arn:aws:iam::aws:policy/ReadOnlyAccess",
    ]
    docs = {p.label: p.document for p in alice.policies}
    assert docs["inline policy AllowKms of user/alice"] == parse_identity_policy(ALICE_INLINE)
    # Only the default version counts, URL-encoded or not.
    assert docs[f"{ARN}:policy/KmsUse"] == parse_identity_policy(KMS_USE_V2)
    assert docs[f"{ARN}:policy/KmsUse"] != parse_identity_policy(KMS_USE_V1)
    assert docs["inline policy AdminsInline of group/Admins"] == parse_identity_policy(
        ADMINS_INLINE
    )
    assert docs["arn:aws:iam::aws:policy/ReadOnlyAccess"] == parse_identity_policy(READ_ONLY)

    bob = iam.user(f"{ARN}:user/eng/bob")
    assert bob is not None
    assert bob.policies == ()
    assert iam.user(f"{ARN}:user/bob") is None  # the path is part of the ARN

    ec2 = iam.role(f"{ARN}:role/service-role/Ec2Role")
    assert ec2 is not None
    assert (ec2.name, ec2.role_id, ec2.max_session_duration) == (
        "Ec2Role",
        "AROAEXAMPLEEC2ROLE001",
        3600,
    )
    assert ec2.trust_policy == parse_trust_policy(EC2_TRUST)
    assert _labels(ec2.policies) == [
        "inline policy Sign of role/Ec2Role",
        "arn:aws:iam::aws:policy/AdministratorAccess",  # built in: not in Policies
    ]
    assert ec2.policies[1].document == parse_identity_policy(_doc("*"))
    assert iam.role(f"{ARN}:role/Ec2Role") is None
    app = iam.role(f"{ARN}:role/App")
    assert app is not None
    assert app.trust_policy == parse_trust_policy(APP_TRUST)
    assert (app.max_session_duration, app.policies) == (7200, ())
    assert iam.knows_account(ACCOUNT)
    assert not iam.knows_account(OTHER)


def test_managed_policy_is_parsed_once_and_shared(tmp_path: Path) -> None:
    doc = export()
    doc["RoleDetailList"][1]["AttachedManagedPolicies"] = [
        {"PolicyName": "KmsUse", "PolicyArn": f"{ARN}:policy/KmsUse"}
    ]
    _write(tmp_path / "iam", ACCOUNT, doc)
    iam = IamDirectory(tmp_path / "iam")
    alice, app = iam.user(f"{ARN}:user/alice"), iam.role(f"{ARN}:role/App")
    assert alice is not None
    assert app is not None
    assert app.policies[0] is alice.policies[1]


def test_aws_managed_power_user_is_built_in(tmp_path: Path) -> None:
    doc = export()
    doc["UserDetailList"][1]["AttachedManagedPolicies"] = [
        {"PolicyName": "AWSKeyManagementServicePowerUser",
         "PolicyArn": "arn:aws:iam::aws:policy/AWSKeyManagementServicePowerUser"},
    ]  # fmt: skip
    _write(tmp_path / "iam", ACCOUNT, doc)
    bob = IamDirectory(tmp_path / "iam").user(f"{ARN}:user/eng/bob")
    assert bob is not None
    assert _labels(bob.policies) == ["arn:aws:iam::aws:policy/AWSKeyManagementServicePowerUser"]


def test_other_files_are_ignored(iam_dir: Path) -> None:
    (iam_dir / "README.json").write_text("not json")
    (iam_dir / "12345.json").write_text("{")
    (iam_dir / f"{OTHER}.json.bak").write_text("{")
    (iam_dir / f"{OTHER}.txt").write_text("{")
    iam = IamDirectory(iam_dir)
    assert iam.knows_account(ACCOUNT)
    assert not iam.knows_account(OTHER)


def test_missing_directory_means_no_iam(tmp_path: Path) -> None:
    clock = FakeClock()
    iam = IamDirectory(tmp_path / "iam", clock=clock)
    assert iam.identity_policies(f"{ARN}:user/alice") == ()
    assert iam.principal_exists(f"{ARN}:user/alice")  # cannot know: exists
    assert not iam.knows_account(ACCOUNT)
    # The directory may appear later.
    _write(tmp_path / "iam", ACCOUNT, export())
    clock.now += 1.0
    assert iam.knows_account(ACCOUNT)
    assert not iam.principal_exists(f"{ARN}:user/nobody")


def test_empty_export(tmp_path: Path) -> None:
    _write(tmp_path / "iam", ACCOUNT, {})
    iam = IamDirectory(tmp_path / "iam")
    assert iam.knows_account(ACCOUNT)
    assert not iam.principal_exists(f"{ARN}:user/alice")


# --- malformed files ----------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting (or, with value ..., deleting) a dotted path like "A[0].B"."""

    def mutate(doc: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        if value is ...:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return mutate


BAD_FIELDS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_set("UserDetailList", {}), "UserDetailList: must be a list"),
    (_set("UserDetailList[0]", "alice"), r"UserDetailList\[0\]: must be an object"),
    (_set("UserDetailList[0].UserName", ...), r"UserDetailList\[0\].UserName: must be"),
    (_set("UserDetailList[1].UserId", 7), r"UserDetailList\[1\].UserId: must be"),
    (_set("UserDetailList[0].Arn", f"arn:aws:iam::{OTHER}:user/alice"),
     r"UserDetailList\[0\].Arn: .* not an IAM user ARN in account 111122223333"),
    (_set("UserDetailList[0].Arn", f"{ARN}:role/alice"),
     r"UserDetailList\[0\].Arn: .* not an IAM user ARN"),
    (_set("UserDetailList[0].Arn", f"{ARN}:user/alicia"),
     r"UserDetailList\[0\].Arn: .* does not end with the name 'alice'"),
    (_set("UserDetailList[1].Arn", f"{ARN}:user/alice"), r"UserDetailList\[1\].(Arn|UserName)"),
    (_set("UserDetailList[0].GroupList[1]", "Ops"),
     r"UserDetailList\[0\].GroupList\[1\]: group 'Ops' is not in GroupDetailList"),
    (_set("UserDetailList[0].UserPolicyList[0].PolicyDocument", _doc("kms:*", "Permit")),
     r"UserDetailList\[0\].UserPolicyList\[0\].PolicyDocument: .*Effect"),
    (_set("UserDetailList[0].UserPolicyList[0].PolicyDocument", _encoded(_doc("kms:*", "Nope"))),
     r"UserDetailList\[0\].UserPolicyList\[0\].PolicyDocument: .*Effect"),
    (_set("UserDetailList[0].UserPolicyList[0].PolicyDocument", ...),
     r"UserDetailList\[0\].UserPolicyList\[0\].PolicyDocument: missing"),
    (_set("UserDetailList[0].UserPolicyList[0].PolicyDocument", 42),
     r"UserDetailList\[0\].UserPolicyList\[0\].PolicyDocument: must be a policy document"),
    (_set("UserDetailList[0].UserPolicyList[0].PolicyName", ""),
     r"UserDetailList\[0\].UserPolicyList\[0\].PolicyName: must be a non-empty string"),
    (_set("UserDetailList[0].AttachedManagedPolicies[0].PolicyArn", f"{ARN}:policy/Gone"),
     r"UserDetailList\[0\].AttachedManagedPolicies\[0\].PolicyArn: managed policy "
     r"arn:aws:iam::111122223333:policy/Gone is not in Policies"),
    (_set("GroupDetailList[1].AttachedManagedPolicies[0].PolicyArn",
          "arn:aws:iam::aws:policy/PowerUserAccess"),
     r"GroupDetailList\[1\].AttachedManagedPolicies\[0\].PolicyArn: managed policy "
     r"arn:aws:iam::aws:policy/PowerUserAccess is not in Policies .*built in"),
    (_set("GroupDetailList[0].GroupPolicyList[0].PolicyDocument", _encoded({"Statement": 3})),
     r"GroupDetailList\[0\].GroupPolicyList\[0\].PolicyDocument: .*Statement"),
    (_set("GroupDetailList[0].Arn", f"{ARN}:group/Other"), r"GroupDetailList\[0\].Arn"),
    (_set("GroupDetailList[1]", {"GroupName": "Admins", "GroupId": "AGPAEXAMPLEADMINS0002",
                                  "Arn": f"{ARN}:group/ops/Admins"}),
     r"GroupDetailList\[1\].GroupName: group 'Admins' appears twice"),
    (_set("RoleDetailList[0].AssumeRolePolicyDocument.Statement", [
        {"Effect": "Allow", "Principal": {"AWS": f"{ARN}:root"}, "Action": "sts:AssumeRole"},
        {"Effect": "Maybe", "Principal": {"AWS": f"{ARN}:root"}, "Action": "sts:AssumeRole"},
    ]), r"RoleDetailList\[0\].AssumeRolePolicyDocument: .*Statement\[1\].Effect"),
    (_set("RoleDetailList[1].AssumeRolePolicyDocument", ...),
     r"RoleDetailList\[1\].AssumeRolePolicyDocument: missing"),
    (_set("RoleDetailList[1].MaxSessionDuration", 600),
     r"RoleDetailList\[1\].MaxSessionDuration: must be an integer 3600-43200"),
    (_set("RoleDetailList[1].MaxSessionDuration", "7200"),
     r"RoleDetailList\[1\].MaxSessionDuration"),
    (_set("RoleDetailList[0].RoleId", None), r"RoleDetailList\[0\].RoleId: must be"),
    (_set("RoleDetailList[0].RolePolicyList[0].PolicyDocument", _doc("kms:*", "allow")),
     r"RoleDetailList\[0\].RolePolicyList\[0\].PolicyDocument: .*Effect"),
    (_set("RoleDetailList[1].RoleName", "Ec2Role"), r"RoleDetailList\[1\].(Arn|RoleName)"),
    (_set("Policies[0].PolicyVersionList[1].IsDefaultVersion", False),
     r"Policies\[0\].PolicyVersionList: no version has IsDefaultVersion true"),
    (_set("Policies[0].PolicyVersionList[0].IsDefaultVersion", True),
     r"Policies\[0\].PolicyVersionList\[1\]: a second version"),
    (_set("Policies[0].DefaultVersionId", "v1"), r"Policies\[0\].PolicyVersionList\[1\].VersionId"),
    (_set("Policies[0].PolicyVersionList[1].Document", _encoded(_doc("kms:*", "Sometimes"))),
     r"Policies\[0\].PolicyVersionList\[1\].Document: .*Effect"),
    (_set("Policies[0].PolicyVersionList[1].Document", ...),
     r"Policies\[0\].PolicyVersionList\[1\].Document: missing"),
    (_set("Policies[1].Arn", f"{ARN}:policy/KmsUse"), r"Policies\[1\].Arn: .*twice"),
    (_set("Policies[1].PolicyName", ...), r"Policies\[1\].PolicyName"),
    (_set("Policies", "none"), r"Policies: must be a list"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "match"), BAD_FIELDS)
def test_malformed_field_is_named(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    doc = copy.deepcopy(export())
    mutate(doc)
    _write(tmp_path / "iam", ACCOUNT, doc)
    with pytest.raises(ConfigError, match=r"iam/111122223333\.json: " + match):
        IamDirectory(tmp_path / "iam")


def test_non_default_versions_are_not_parsed(tmp_path: Path) -> None:
    doc = export()
    doc["Policies"][0]["PolicyVersionList"][0]["Document"] = _doc("kms:*", "Whatever")
    _write(tmp_path / "iam", ACCOUNT, doc)
    assert IamDirectory(tmp_path / "iam").user(f"{ARN}:user/alice") is not None


@pytest.mark.parametrize(
    ("text", "match"),
    [("{", "not valid JSON"), ("[]", r"\(document\): must be an object")],
)
def test_malformed_file(tmp_path: Path, text: str, match: str) -> None:
    _write(tmp_path / "iam", ACCOUNT, text)
    with pytest.raises(ConfigError, match=r"iam/111122223333\.json: " + match):
        IamDirectory(tmp_path / "iam")


# --- lookups ------------------------------------------------------------------------------------


def test_identity_policies(iam_dir: Path) -> None:
    iam = IamDirectory(iam_dir)
    alice = iam.user(f"{ARN}:user/alice")
    ec2 = iam.role(f"{ARN}:role/service-role/Ec2Role")
    assert alice is not None
    assert ec2 is not None
    assert iam.identity_policies(f"{ARN}:user/alice") == alice.policies
    assert iam.identity_policies(f"{ARN}:role/service-role/Ec2Role") == ec2.policies
    session = f"arn:aws:sts::{ACCOUNT}:assumed-role/Ec2Role/i-0123"
    assert iam.identity_policies(session, f"{ARN}:role/service-role/Ec2Role") == ec2.policies
    assert iam.identity_policies(session) == ec2.policies  # the session names its role
    assert iam.identity_policies(session, f"{ARN}:role/Gone") == ()
    assert iam.identity_policies(f"{ARN}:root") == ()
    assert iam.identity_policies(f"{ARN}:user/nobody") == ()
    assert iam.identity_policies(f"arn:aws:iam::{OTHER}:user/alice") == ()
    assert iam.identity_policies("*") == ()


def test_principal_exists(iam_dir: Path) -> None:
    iam = IamDirectory(iam_dir)
    exists = {
        "*": True,
        f"{ARN}:root": True,
        f"arn:aws:iam::{OTHER}:root": True,
        ACCOUNT: True,
        f"{ARN}:user/alice": True,
        f"{ARN}:user/eng/bob": True,
        f"{ARN}:user/bob": False,  # bob has a path
        f"{ARN}:user/mallory": False,
        f"{ARN}:role/App": True,
        f"{ARN}:role/service-role/Ec2Role": True,
        f"{ARN}:role/Ec2Role": False,
        f"{ARN}:role/Gone": False,
        f"arn:aws:sts::{ACCOUNT}:assumed-role/Ec2Role/i-0123": True,
        f"arn:aws:sts::{ACCOUNT}:assumed-role/Gone/s": False,
        f"{ARN}:group/Admins": False,  # a group is never a principal
        f"arn:aws:iam::{OTHER}:user/anyone": True,  # no file: IAM would know, we cannot
        f"arn:aws:iam::{OTHER}:role/any/Role": True,
        f"arn:aws:sts::{OTHER}:assumed-role/R/s": True,
        "not-an-arn": False,
        f"arn:aws:iam::{ACCOUNT}:policy/KmsUse": False,
    }
    assert {arn: iam.principal_exists(arn) for arn in exists} == exists


# --- reloading ----------------------------------------------------------------------------------


def test_reload_on_change_within_the_interval(iam_dir: Path) -> None:
    clock = FakeClock()
    iam = IamDirectory(iam_dir, clock=clock)
    generation = iam.generation()
    doc = export()
    doc["UserDetailList"][1]["UserPolicyList"] = [
        {"PolicyName": "New", "PolicyDocument": _doc("kms:Decrypt")}
    ]
    _write(iam_dir, ACCOUNT, doc, mtime_ns=1_700_000_000_000_000_000)
    clock.now += 0.5  # within the interval: not looked at yet
    bob = iam.user(f"{ARN}:user/eng/bob")
    assert bob is not None
    assert bob.policies == ()
    assert iam.generation() == generation
    clock.now += 0.5
    bob = iam.user(f"{ARN}:user/eng/bob")
    assert bob is not None
    assert _labels(bob.policies) == ["inline policy New of user/bob"]
    assert iam.generation() == generation + 1
    clock.now += 5
    assert iam.generation() == generation + 1  # nothing changed: no bump


def test_new_file_and_removed_file(iam_dir: Path) -> None:
    clock = FakeClock()
    iam = IamDirectory(iam_dir, clock=clock)
    other = {"UserDetailList": [{"UserName": "carol", "UserId": "AIDAEXAMPLECAROL00001",
                                 "Arn": f"arn:aws:iam::{OTHER}:user/carol"}]}  # fmt: skip
    _write(iam_dir, OTHER, other)
    clock.now += 1
    assert iam.knows_account(OTHER)
    assert iam.user(f"arn:aws:iam::{OTHER}:user/carol") is not None
    assert iam.generation() == 1
    (iam_dir / f"{ACCOUNT}.json").unlink()
    clock.now += 1
    assert not iam.knows_account(ACCOUNT)
    assert iam.user(f"{ARN}:user/alice") is None
    assert iam.identity_policies(f"{ARN}:user/alice") == ()
    assert iam.principal_exists(f"{ARN}:user/mallory")  # unknown account again
    assert iam.generation() == 2


def test_malformed_reload_keeps_previous_and_logs_once(
    iam_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    iam = IamDirectory(iam_dir, clock=clock)
    before = iam.user(f"{ARN}:user/alice")
    bad = export()
    bad["RoleDetailList"][0]["AssumeRolePolicyDocument"]["Statement"][0]["Effect"] = "Maybe"
    _write(iam_dir, ACCOUNT, bad, mtime_ns=1_700_000_000_000_000_000)
    caplog.set_level(logging.INFO, logger="hsmbridge.identity.iam")
    clock.now += 1
    assert iam.user(f"{ARN}:user/alice") == before
    assert iam.role(f"{ARN}:role/service-role/Ec2Role") is not None
    assert iam.generation() == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "iam/111122223333.json" in message
    assert "RoleDetailList[0].AssumeRolePolicyDocument" in message
    assert "previous version stays in force" in message
    clock.now += 1
    iam.generation()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1  # once per change
    # Fixed: loaded.
    fixed = export()
    fixed["UserDetailList"][0]["UserPolicyList"] = []
    _write(iam_dir, ACCOUNT, fixed, mtime_ns=1_700_000_001_000_000_000)
    clock.now += 1
    alice = iam.user(f"{ARN}:user/alice")
    assert alice is not None
    assert "inline policy AllowKms of user/alice" not in _labels(alice.policies)
    assert iam.generation() == 1


def test_malformed_new_file_is_not_loaded(iam_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    iam = IamDirectory(iam_dir, clock=clock)
    _write(iam_dir, OTHER, "{")
    clock.now += 1
    with caplog.at_level(logging.ERROR, logger="hsmbridge.identity.iam"):
        assert not iam.knows_account(OTHER)
    assert f"{OTHER}.json: not valid JSON" in caplog.text
    assert iam.knows_account(ACCOUNT)


def test_concurrent_readers_while_the_file_changes(iam_dir: Path) -> None:
    iam = IamDirectory(iam_dir, interval_s=0.0)
    one, two = export(), export()
    two["UserDetailList"][0]["UserPolicyList"] = []
    expected = {
        len(IamDirectory(iam_dir).identity_policies(f"{ARN}:user/alice")),
        len(IamDirectory(iam_dir).identity_policies(f"{ARN}:user/alice")) - 1,
    }
    failures: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        try:
            last = 0
            while not stop.is_set():
                generation = iam.generation()
                assert generation >= last
                last = generation
                seen.add(len(iam.identity_policies(f"{ARN}:user/alice")))
                assert iam.principal_exists(f"{ARN}:user/alice")
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for i in range(40):
        # Written aside and renamed in, as an editor or a deploy does: readers never see half.
        tmp = iam_dir / "tmp"
        tmp.write_text(json.dumps(two if i % 2 else one))
        os.utime(tmp, ns=(1_700_000_000_000_000_000 + i, 1_700_000_000_000_000_000 + i))
        tmp.replace(iam_dir / f"{ACCOUNT}.json")
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
    assert seen <= expected
    assert seen
    assert iam.generation() >= 1


# --- the demo file ------------------------------------------------------------------------------


def test_write_demo_iam(tmp_path: Path) -> None:
    path = tmp_path / "iam" / f"{ACCOUNT}.json"
    write_demo_iam(path, ACCOUNT, f"{ARN}:user/hsmbridge-admin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    user = IamDirectory(tmp_path / "iam").user(f"{ARN}:user/hsmbridge-admin")
    assert user is not None
    assert re.fullmatch(r"AIDA[A-Z0-9]{17}", user.user_id)
    assert user.name == "hsmbridge-admin"
    [policy] = user.policies
    assert policy.label == "inline policy AllowEverything of user/hsmbridge-admin"
    assert policy.document == parse_identity_policy(_doc("*"))
    raw = json.loads(path.read_text())
    assert set(raw) == {"UserDetailList", "GroupDetailList", "RoleDetailList", "Policies"}
    with pytest.raises(FileExistsError):
        write_demo_iam(path, ACCOUNT, f"{ARN}:user/hsmbridge-admin")


def test_write_demo_iam_with_a_path_and_bad_arns(tmp_path: Path) -> None:
    path = tmp_path / "iam" / f"{ACCOUNT}.json"
    write_demo_iam(path, ACCOUNT, f"{ARN}:user/ops/admin")
    assert json.loads(path.read_text())["UserDetailList"][0]["Path"] == "/ops/"
    assert IamDirectory(tmp_path / "iam").user(f"{ARN}:user/ops/admin") is not None
    for arn in (f"{ARN}:root", f"arn:aws:iam::{OTHER}:user/admin", f"{ARN}:role/admin"):
        with pytest.raises(ValueError, match="not an IAM user ARN"):
            write_demo_iam(tmp_path / "x.json", ACCOUNT, arn)
