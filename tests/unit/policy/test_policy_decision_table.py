"""The KMS authorization decision, as a table checked by hand against AWS's documented logic.

Each row: who calls, the key policy, the caller's IAM policies, its session policy, the action,
the request's condition keys, a grant, and the expected outcome with its AccessDenied reason.
The rules (KMS key authorization): an explicit deny anywhere wins, grants included; the key
policy must allow the caller directly or delegate to its account (root) with IAM allowing too, so
IAM alone is never enough; across accounts only the cross-account operations work and both sides
must allow; a grant is the other way in; the account root is allowed by IAM implicitly; a session
policy limits the identity side and any key-policy allow that does not name the session itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hsmbridge.policy.decision import Decision, decide_identity_only, decide_resource_access
from hsmbridge.policy.document import PolicyDocument
from tests.unit.policy.policy_fixtures import (
    EXT,
    EXT_ROLE,
    KEY,
    OTHER_KEY,
    OWN,
    OWN_ROOT,
    ROLE_APP,
    allow,
    aws,
    deny,
    facts,
    iam,
    key_policy,
    stmt,
    trust,
)

ALICE = f"arn:aws:iam::{OWN}:user/alice"
SESSION = f"arn:aws:sts::{OWN}:assumed-role/app/s1"
CAROL = f"arn:aws:iam::{EXT}:user/carol"

KEY_POLICIES: dict[str, PolicyDocument] = {
    "default": key_policy(OWN_ROOT),
    "dave": key_policy(stmt("Allow", aws(f"arn:aws:iam::{OWN}:user/dave"), "kms:Encrypt")),
    "alice": key_policy(
        OWN_ROOT, stmt("Allow", aws(ALICE), ["kms:Encrypt", "kms:Decrypt"], Sid="Alice")
    ),
    "alice_only": key_policy(stmt("Allow", aws(ALICE), "kms:*")),
    "role": key_policy(stmt("Allow", aws(ROLE_APP), "kms:Encrypt")),
    "session": key_policy(stmt("Allow", aws(SESSION), "kms:Encrypt")),
    "wild": key_policy(stmt("Allow", "*", "kms:Encrypt")),
    "deny_alice": key_policy(OWN_ROOT, stmt("Deny", aws(ALICE), "kms:Encrypt", Sid="NoAlice")),
    "deny_all": key_policy(OWN_ROOT, stmt("Deny", "*", "kms:*", Sid="DenyAll")),
    "np_deny": key_policy(
        OWN_ROOT, {"Effect": "Deny", "NotPrincipal": aws(ALICE), "Action": "kms:Encrypt"}
    ),
    "alice_ctx": key_policy(
        OWN_ROOT,
        stmt(
            "Allow",
            aws(ALICE),
            "kms:Encrypt",
            Condition={"StringEquals": {"kms:EncryptionContext:Dept": "IT"}},
        ),
    ),
    "ext": key_policy(
        OWN_ROOT,
        stmt(
            "Allow",
            aws(f"arn:aws:iam::{EXT}:root"),
            ["kms:Encrypt", "kms:DescribeKey", "kms:ScheduleKeyDeletion"],
        ),
    ),
    "ext_id": key_policy(OWN_ROOT, stmt("Allow", aws(EXT), "kms:Encrypt")),  # bare account id
    "carol": key_policy(OWN_ROOT, stmt("Allow", aws(CAROL), "kms:Encrypt")),
    "service": key_policy(
        OWN_ROOT,
        stmt(
            "Allow",
            {"Service": "cloudtrail.amazonaws.com"},
            ["kms:GenerateDataKey*", "kms:Encrypt"],
        ),
    ),
    "caller_acct": key_policy(
        stmt("Allow", "*", "kms:Encrypt", Condition={"StringEquals": {"aws:PrincipalAccount": OWN}})
    ),
    "role_arn_like": key_policy(
        stmt(
            "Allow",
            "*",
            "kms:Encrypt",
            Condition={"ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{OWN}:role/app*"}},
        )
    ),
    "deny_foreign": key_policy(
        OWN_ROOT,
        stmt("Allow", aws(EXT), "kms:Encrypt"),
        stmt(
            "Deny",
            "*",
            "kms:*",
            Sid="OwnAccountOnly",
            Condition={"StringNotEquals": {"aws:PrincipalAccount": OWN}},
        ),
    ),
    "notaction": key_policy(
        {"Effect": "Allow", "Principal": aws(ALICE), "NotAction": "kms:ScheduleKeyDeletion"}
    ),
    "root_id": key_policy(stmt("Allow", aws(OWN), "kms:*")),  # account id, not the root ARN
}

IDENTITY: dict[str, list[PolicyDocument]] = {
    "none": [],
    "enc": [iam(allow("kms:Encrypt", KEY))],
    "all": [iam(allow("kms:*"))],
    "other_key": [iam(allow("kms:Encrypt", OTHER_KEY))],
    "deny": [iam(allow("kms:*")), iam(deny("kms:Encrypt"))],
    "star": [iam(allow("kms:*", f"arn:aws:kms:*:{OWN}:key/*"))],
    "lower": [iam(allow("kms:encrypt", KEY))],
    "gen": [iam(allow("kms:Gen*", KEY))],
    "q": [iam(allow("kms:?ncrypt", KEY))],
    "notdec": [iam({"Effect": "Allow", "NotAction": "kms:Decrypt", "Resource": "*"})],
    "case_res": [iam(allow("kms:Encrypt", KEY.upper()))],
    "region_star": [iam(allow("kms:*", "arn:aws:kms:us-east-1:*:key/*"))],
    "west": [iam(allow("kms:*", "arn:aws:kms:us-west-2:*"))],
    "not_other": [iam({"Effect": "Allow", "Action": "kms:*", "NotResource": OTHER_KEY})],
    "not_key": [iam({"Effect": "Allow", "Action": "kms:*", "NotResource": KEY})],
    "alias": [iam(allow("kms:*", "arn:aws:kms:*:*:alias/*"))],
    "if_it": [
        iam(
            allow(
                "kms:Encrypt", KEY, Condition={"StringEquals": {"kms:EncryptionContext:Dept": "IT"}}
            )
        )
    ],
    "if_exists": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={"StringEqualsIfExists": {"kms:EncryptionContext:Dept": "IT"}},
            )
        )
    ],
    "not_hr": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={"StringNotEquals": {"kms:EncryptionContext:Dept": "HR"}},
            )
        )
    ],
    "ip": [
        iam(
            allow("kms:*"),
            deny("kms:Encrypt", Condition={"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}}),
        )
    ],
    "tls": [iam(allow("kms:Encrypt", KEY, Condition={"Bool": {"aws:SecureTransport": "true"}}))],
    "all_keys": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={
                    "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["Dept", "Team"]}
                },
            )
        )
    ],
    "any_key": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "Dept"}},
            )
        )
    ],
    "before": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}},
            )
        )
    ],
    "owner": [
        iam(
            allow(
                "kms:Encrypt",
                KEY,
                Condition={"StringEquals": {"aws:ResourceTag/Owner": "${aws:username}"}},
            )
        )
    ],
    "has_ctx": [
        iam(allow("kms:Encrypt", KEY, Condition={"Null": {"kms:EncryptionContextKeys": "false"}}))
    ],
    "enc_ext": [iam(allow(["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"], KEY))],
}

SESSIONS: dict[str | None, PolicyDocument | None] = {
    None: None,
    "enc": iam(allow("kms:Encrypt")),
    "dec": iam(allow("kms:Decrypt")),
    "deny": iam(allow("kms:*"), deny("*")),
}

CONTEXTS: dict[str, dict[str, Any]] = {
    "-": {},
    "IT": {"kms:EncryptionContext:Dept": "IT", "kms:EncryptionContextKeys": ["Dept"]},
    "it_lowkey": {"kms:encryptioncontext:dept": "IT"},
    "it_lowval": {"kms:EncryptionContext:Dept": "it"},
    "HR": {"kms:EncryptionContext:Dept": "HR", "kms:EncryptionContextKeys": ["Dept"]},
    "net10": {"aws:SourceIp": "10.1.2.3"},
    "net192": {"aws:SourceIp": "192.0.2.1"},
    "tls": {"aws:SecureTransport": True},
    "plain": {"aws:SecureTransport": False},
    "k_dept_other": {"kms:EncryptionContextKeys": ["Dept", "Other"]},
    "k_team": {"kms:EncryptionContextKeys": ["Team"]},
    "k_team_dept": {"kms:EncryptionContextKeys": ["Team", "Dept"]},
    "k_empty": {"kms:EncryptionContextKeys": []},
    "2024": {"aws:CurrentTime": datetime(2024, 5, 1, tzinfo=UTC)},
    "2031": {"aws:CurrentTime": datetime(2031, 5, 1, tzinfo=UTC)},
    "owner_alice": {"aws:username": "alice", "aws:ResourceTag/Owner": "alice"},
    "owner_bob": {"aws:username": "alice", "aws:ResourceTag/Owner": "bob"},
    "owner_anon": {"aws:ResourceTag/Owner": "alice"},
}

Row = tuple[str, str, str, str | None, str, str, str | None, str]
OK = "allowed"
NO_RES = "because no resource-based policy allows the {action} action"
NO_ID = "because no identity-based policy allows the {action} action"
NO_SESS = "because no session policy allows the {action} action"
DENY_RES = "with an explicit deny in a resource-based policy"
DENY_ID = "with an explicit deny in an identity-based policy"
DENY_SESS = "with an explicit deny in a session policy"

E, D = "kms:Encrypt", "kms:Decrypt"
SKD, DK, GDK = "kms:ScheduleKeyDeletion", "kms:DescribeKey", "kms:GenerateDataKey"

# fmt: off
CASES: list[Row] = [
    # caller      key policy     IAM         session  action  context  grant  expected
    # -- same account, default key policy: it delegates to IAM ----------------------------------
    ("root",      "default",     "none",     None,    E,      "-",     None,  OK),
    ("root",      "default",     "none",     None,    SKD,    "-",     None,  OK),
    ("alice",     "default",     "none",     None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "enc",      None,    E,      "-",     None,  OK),
    ("alice",     "default",     "enc",      None,    D,      "-",     None,  NO_ID),
    ("alice",     "default",     "all",      None,    D,      "-",     None,  OK),
    ("alice",     "default",     "other_key", None,   E,      "-",     None,  NO_ID),
    ("alice",     "default",     "star",     None,    E,      "-",     None,  OK),
    ("alice",     "default",     "deny",     None,    E,      "-",     None,  DENY_ID),
    ("alice",     "default",     "deny",     None,    D,      "-",     None,  OK),
    ("alice",     "default",     "none",     None,    E,      "-",     "g1",  OK),
    ("alice",     "default",     "deny",     None,    E,      "-",     "g1",  DENY_ID),
    ("session",   "default",     "none",     None,    E,      "-",     None,  NO_ID),
    ("session",   "default",     "enc",      None,    E,      "-",     None,  OK),
    ("session",   "default",     "enc",      "enc",   E,      "-",     None,  OK),
    ("session",   "default",     "enc",      "dec",   E,      "-",     None,  NO_SESS),
    ("session",   "default",     "all",      "dec",   D,      "-",     None,  OK),
    ("session",   "default",     "none",     "enc",   E,      "-",     None,  NO_ID),
    ("session",   "default",     "enc",      "deny",  E,      "-",     None,  DENY_SESS),
    ("session",   "default",     "enc",      "dec",   E,      "-",     "g1",  OK),
    ("cloudtrail", "default",    "none",     None,    E,      "-",     None,  NO_RES),
    ("bob",       "default",     "enc",      None,    E,      "-",     None,  OK),
    ("bob",       "default",     "all",      None,    SKD,    "-",     None,  OK),
    ("root",      "root_id",     "none",     None,    E,      "-",     None,  OK),
    ("alice",     "root_id",     "enc",      None,    E,      "-",     None,  OK),
    ("alice",     "root_id",     "none",     None,    E,      "-",     None,  NO_ID),
    # -- a key policy that does not delegate: IAM alone is not enough -------------------------
    ("root",      "dave",        "none",     None,    E,      "-",     None,  NO_RES),
    ("alice",     "dave",        "all",      None,    E,      "-",     None,  NO_RES),
    ("alice",     "dave",        "enc",      None,    E,      "-",     None,  NO_RES),
    ("session",   "dave",        "all",      None,    E,      "-",     None,  NO_RES),
    ("session",   "dave",        "all",      "enc",   E,      "-",     None,  NO_RES),
    ("bob",       "dave",        "all",      None,    E,      "-",     "g1",  OK),
    ("alice",     "dave",        "none",     None,    E,      "-",     "g1",  OK),
    ("carol",     "dave",        "all",      None,    E,      "-",     None,  NO_RES),
    ("dave",      "dave",        "none",     None,    E,      "-",     None,  OK),
    ("dave",      "dave",        "none",     None,    D,      "-",     None,  NO_RES),
    ("dave",      "dave",        "all",      None,    D,      "-",     None,  NO_RES),
    # -- the key policy names the user directly -----------------------------------------------
    ("alice",     "alice",       "none",     None,    E,      "-",     None,  OK),
    ("alice",     "alice",       "none",     None,    D,      "-",     None,  OK),
    ("alice",     "alice",       "none",     None,    SKD,    "-",     None,  NO_ID),
    ("alice",     "alice",       "all",      None,    SKD,    "-",     None,  OK),
    ("alice",     "alice",       "deny",     None,    E,      "-",     None,  DENY_ID),
    ("alice",     "alice",       "deny",     None,    D,      "-",     None,  OK),
    ("bob",       "alice",       "none",     None,    E,      "-",     None,  NO_ID),
    ("bob",       "alice",       "enc",      None,    E,      "-",     None,  OK),
    ("alice",     "alice_only",  "none",     None,    E,      "-",     None,  OK),
    ("alice",     "alice_only",  "none",     None,    SKD,    "-",     None,  OK),
    ("bob",       "alice_only",  "all",      None,    E,      "-",     None,  NO_RES),
    ("root",      "alice_only",  "none",     None,    E,      "-",     None,  NO_RES),
    ("session",   "alice_only",  "all",      None,    E,      "-",     None,  NO_RES),
    ("alice",     "notaction",   "none",     None,    E,      "-",     None,  OK),
    ("alice",     "notaction",   "none",     None,    SKD,    "-",     None,  NO_RES),
    ("alice",     "notaction",   "all",      None,    SKD,    "-",     None,  NO_RES),
    # -- the key policy names a role: its sessions match; session policies limit it -----------
    ("session",   "role",        "none",     None,    E,      "-",     None,  OK),
    ("session",   "role",        "none",     None,    D,      "-",     None,  NO_RES),
    ("session",   "role",        "all",      None,    D,      "-",     None,  NO_RES),
    ("session",   "role",        "none",     "enc",   E,      "-",     None,  OK),
    ("session",   "role",        "none",     "dec",   E,      "-",     None,  NO_SESS),
    ("session",   "role",        "none",     "deny",  E,      "-",     None,  DENY_SESS),
    ("session",   "role",        "deny",     None,    E,      "-",     None,  DENY_ID),
    ("session2",  "role",        "none",     None,    E,      "-",     None,  OK),
    ("ops",       "role",        "all",      None,    E,      "-",     None,  NO_RES),
    ("alice",     "role",        "all",      None,    E,      "-",     None,  NO_RES),
    # -- the key policy names one session exactly: a session policy does not limit it ---------
    ("session",   "session",     "none",     None,    E,      "-",     None,  OK),
    ("session",   "session",     "none",     "dec",   E,      "-",     None,  OK),
    ("session",   "session",     "none",     "deny",  E,      "-",     None,  DENY_SESS),
    ("session2",  "session",     "none",     None,    E,      "-",     None,  NO_RES),
    ("session2",  "session",     "all",      None,    E,      "-",     None,  NO_RES),
    # -- Principal "*" ----------------------------------------------------------------------------
    ("alice",     "wild",        "none",     None,    E,      "-",     None,  OK),
    ("root",      "wild",        "none",     None,    E,      "-",     None,  OK),
    ("session",   "wild",        "none",     "dec",   E,      "-",     None,  NO_SESS),
    ("session",   "wild",        "none",     "enc",   E,      "-",     None,  OK),
    ("carol",     "wild",        "none",     None,    E,      "-",     None,  NO_ID),
    ("carol",     "wild",        "enc_ext",  None,    E,      "-",     None,  OK),
    ("ext_root",  "wild",        "none",     None,    E,      "-",     None,  OK),
    ("alice",     "wild",        "none",     None,    D,      "-",     None,  NO_RES),
    ("alice",     "wild",        "all",      None,    D,      "-",     None,  NO_RES),
    ("cloudtrail", "wild",       "none",     None,    E,      "-",     None,  OK),
    # -- explicit denies in the key policy ---------------------------------------------------
    ("alice",     "deny_alice",  "all",      None,    E,      "-",     None,  DENY_RES),
    ("alice",     "deny_alice",  "all",      None,    D,      "-",     None,  OK),
    ("bob",       "deny_alice",  "all",      None,    E,      "-",     None,  OK),
    ("alice",     "deny_alice",  "all",      None,    E,      "-",     "g1",  DENY_RES),
    ("root",      "deny_alice",  "none",     None,    E,      "-",     None,  OK),
    ("alice",     "deny_alice",  "deny",     None,    E,      "-",     None,  DENY_RES),
    ("root",      "deny_all",    "none",     None,    E,      "-",     None,  DENY_RES),
    ("root",      "deny_all",    "none",     None,    SKD,    "-",     None,  DENY_RES),
    ("alice",     "deny_all",    "all",      None,    E,      "-",     None,  DENY_RES),
    ("carol",     "deny_all",    "all",      None,    E,      "-",     None,  DENY_RES),
    ("cloudtrail", "deny_all",   "none",     None,    E,      "-",     None,  DENY_RES),
    ("alice",     "deny_all",    "all",      None,    E,      "-",     "g1",  DENY_RES),
    ("session",   "deny_all",    "all",      "deny",  E,      "-",     None,  DENY_RES),
    # -- Deny with NotPrincipal: everyone but alice -------------------------------------------
    ("alice",     "np_deny",     "enc",      None,    E,      "-",     None,  OK),
    ("bob",       "np_deny",     "enc",      None,    E,      "-",     None,  DENY_RES),
    ("root",      "np_deny",     "none",     None,    E,      "-",     None,  DENY_RES),
    ("bob",       "np_deny",     "all",      None,    D,      "-",     None,  OK),
    ("carol",     "np_deny",     "all",      None,    E,      "-",     None,  DENY_RES),
    # -- conditions in the key policy ----------------------------------------------------------
    ("alice",     "alice_ctx",   "none",     None,    E,      "IT",    None,  OK),
    ("alice",     "alice_ctx",   "none",     None,    E,      "HR",    None,  NO_ID),
    ("alice",     "alice_ctx",   "none",     None,    E,      "-",     None,  NO_ID),
    ("alice",     "alice_ctx",   "none",     None,    E,      "it_lowkey", None, OK),
    ("alice",     "alice_ctx",   "none",     None,    E,      "it_lowval", None, NO_ID),
    ("alice",     "alice_ctx",   "enc",      None,    E,      "HR",    None,  OK),
    ("alice",     "caller_acct", "none",     None,    E,      "-",     None,  OK),
    ("carol",     "caller_acct", "enc_ext",  None,    E,      "-",     None,  NO_RES),
    ("session",   "role_arn_like", "none",   None,    E,      "-",     None,  OK),
    ("ops",       "role_arn_like", "all",    None,    E,      "-",     None,  NO_RES),
    ("alice",     "role_arn_like", "all",    None,    E,      "-",     None,  NO_RES),
    ("carol",     "deny_foreign", "enc_ext", None,    E,      "-",     None,  DENY_RES),
    ("alice",     "deny_foreign", "enc",     None,    E,      "-",     None,  OK),
    ("ext_root",  "deny_foreign", "none",    None,    E,      "-",     "g1",  DENY_RES),
    # -- across accounts: both sides must allow, only some operations ---------------------------
    ("carol",     "ext",         "none",     None,    E,      "-",     None,  NO_ID),
    ("carol",     "ext",         "enc_ext",  None,    E,      "-",     None,  OK),
    ("carol",     "ext",         "all",      None,    E,      "-",     None,  OK),
    ("carol",     "ext",         "all",      None,    D,      "-",     None,  NO_RES),
    ("carol",     "ext",         "all",      None,    SKD,    "-",     None,  NO_RES),
    ("carol",     "ext",         "all",      None,    DK,     "-",     None,  OK),
    ("carol",     "ext",         "enc_ext",  None,    DK,     "-",     None,  OK),
    ("carol",     "ext",         "other_key", None,   E,      "-",     None,  NO_ID),
    ("carol",     "ext",         "deny",     None,    E,      "-",     None,  DENY_ID),
    ("carol",     "ext",         "none",     None,    E,      "-",     "g1",  OK),
    ("ext_root",  "ext",         "none",     None,    E,      "-",     None,  OK),
    ("ext_root",  "ext",         "none",     None,    SKD,    "-",     None,  NO_RES),
    ("ext_root",  "ext",         "none",     None,    D,      "-",     None,  NO_RES),
    ("ext_session", "ext",       "none",     None,    E,      "-",     None,  NO_ID),
    ("ext_session", "ext",       "enc_ext",  None,    E,      "-",     None,  OK),
    ("ext_session", "ext",       "enc_ext",  "dec",   E,      "-",     None,  NO_SESS),
    ("ext_session", "ext",       "enc_ext",  "enc",   E,      "-",     None,  OK),
    ("ext_session", "ext",       "enc_ext",  "deny",  E,      "-",     None,  DENY_SESS),
    ("carol",     "ext_id",      "enc_ext",  None,    E,      "-",     None,  OK),
    ("carol",     "ext_id",      "none",     None,    E,      "-",     None,  NO_ID),
    ("carol",     "default",     "all",      None,    E,      "-",     None,  NO_RES),
    ("carol",     "default",     "all",      None,    E,      "-",     "g1",  OK),
    ("ext_root",  "default",     "none",     None,    E,      "-",     None,  NO_RES),
    ("ext_session", "default",   "all",      None,    E,      "-",     None,  NO_RES),
    ("alice",     "ext",         "enc",      None,    E,      "-",     None,  OK),
    ("alice",     "ext",         "none",     None,    E,      "-",     None,  NO_ID),
    # -- the key policy names one external user: IAM on that side must still allow -------------
    ("carol",     "carol",       "none",     None,    E,      "-",     None,  NO_ID),
    ("carol",     "carol",       "enc_ext",  None,    E,      "-",     None,  OK),
    ("erin",      "carol",       "enc_ext",  None,    E,      "-",     None,  NO_RES),
    ("ext_root",  "carol",       "none",     None,    E,      "-",     None,  NO_RES),
    ("carol",     "carol",       "enc_ext",  None,    D,      "-",     None,  NO_RES),
    # -- service principals ------------------------------------------------------------------
    ("cloudtrail", "service",    "none",     None,    GDK,    "-",     None,  OK),
    ("cloudtrail", "service",    "none",     None,    "kms:GenerateDataKeyWithoutPlaintext",
                                                              "-",     None,  OK),
    ("cloudtrail", "service",    "none",     None,    D,      "-",     None,  NO_RES),
    ("s3",        "service",     "none",     None,    GDK,    "-",     None,  NO_RES),
    ("alice",     "service",     "none",     None,    GDK,    "-",     None,  NO_ID),
    # -- actions: case-insensitive, wildcards, NotAction --------------------------------------
    ("alice",     "default",     "lower",    None,    E,      "-",     None,  OK),
    ("alice",     "default",     "gen",      None,    GDK,    "-",     None,  OK),
    ("alice",     "default",     "gen",      None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "q",        None,    E,      "-",     None,  OK),
    ("alice",     "default",     "q",        None,    D,      "-",     None,  NO_ID),
    ("alice",     "default",     "notdec",   None,    E,      "-",     None,  OK),
    ("alice",     "default",     "notdec",   None,    D,      "-",     None,  NO_ID),
    # -- resources: case-sensitive, ARN-aware wildcards, NotResource ---------------------------
    ("alice",     "default",     "case_res", None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "region_star", None, E,      "-",     None,  OK),
    ("alice",     "default",     "west",     None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "not_other", None,   E,      "-",     None,  OK),
    ("alice",     "default",     "not_key",  None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "alias",    None,    E,      "-",     None,  NO_ID),
    # -- conditions in IAM policies -------------------------------------------------------------
    ("alice",     "default",     "if_it",    None,    E,      "IT",    None,  OK),
    ("alice",     "default",     "if_it",    None,    E,      "HR",    None,  NO_ID),
    ("alice",     "default",     "if_it",    None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "if_exists", None,   E,      "-",     None,  OK),
    ("alice",     "default",     "if_exists", None,   E,      "HR",    None,  NO_ID),
    ("alice",     "default",     "not_hr",   None,    E,      "-",     None,  OK),
    ("alice",     "default",     "not_hr",   None,    E,      "HR",    None,  NO_ID),
    ("alice",     "default",     "ip",       None,    E,      "net10", None,  OK),
    ("alice",     "default",     "ip",       None,    E,      "net192", None, DENY_ID),
    ("alice",     "default",     "ip",       None,    E,      "-",     None,  DENY_ID),
    ("alice",     "default",     "ip",       None,    D,      "net192", None, OK),
    ("alice",     "default",     "tls",      None,    E,      "tls",   None,  OK),
    ("alice",     "default",     "tls",      None,    E,      "plain", None,  NO_ID),
    ("alice",     "default",     "tls",      None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "all_keys", None,    E,      "IT",    None,  OK),
    ("alice",     "default",     "all_keys", None,    E,      "k_dept_other", None, NO_ID),
    ("alice",     "default",     "all_keys", None,    E,      "-",     None,  OK),
    ("alice",     "default",     "all_keys", None,    E,      "k_empty", None, OK),
    ("alice",     "default",     "any_key",  None,    E,      "k_team", None, NO_ID),
    ("alice",     "default",     "any_key",  None,    E,      "-",     None,  NO_ID),
    ("alice",     "default",     "any_key",  None,    E,      "k_team_dept", None, OK),
    ("alice",     "default",     "before",   None,    E,      "2024",  None,  OK),
    ("alice",     "default",     "before",   None,    E,      "2031",  None,  NO_ID),
    ("alice",     "default",     "owner",    None,    E,      "owner_alice", None, OK),
    ("alice",     "default",     "owner",    None,    E,      "owner_bob", None, NO_ID),
    ("alice",     "default",     "owner",    None,    E,      "owner_anon", None, NO_ID),
    ("alice",     "default",     "has_ctx",  None,    E,      "IT",    None,  OK),
    ("alice",     "default",     "has_ctx",  None,    E,      "-",     None,  NO_ID),
]
# fmt: on


def _decide(
    caller: str, kp: str, ids: str, *, session: str | None, action: str, ctx: str, grant: str | None
) -> Decision:
    return decide_resource_access(
        facts(caller, action, KEY, CONTEXTS[ctx]),
        resource_account=OWN,
        resource_policy=KEY_POLICIES[kp],
        resource_label="key policy",
        identity_policies=[
            (f"arn:aws:iam::{OWN}:policy/P{i}", d) for i, d in enumerate(IDENTITY[ids])
        ],
        session_policy=SESSIONS[session],
        grant=grant,
    )


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 150
    assert len(set(CASES)) == len(CASES), "duplicate rows"


@pytest.mark.parametrize(
    "row", CASES, ids=[f"{i:03d}-" + "-".join(map(str, c[:7])) for i, c in enumerate(CASES)]
)
def test_decision_table(row: Row) -> None:
    caller, kp, ids, session, action, ctx, grant, expected = row
    decision = _decide(caller, kp, ids, session=session, action=action, ctx=ctx, grant=grant)
    if expected == OK:
        assert decision.allowed, decision
        assert decision.reason == ""
    else:
        assert not decision.allowed, decision
        assert decision.reason == expected.format(action=action)


# --- the seed's cross-account example -----------------------------------------------------------

SEED_KEY = "arn:aws:kms:us-west-2:444455556666:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SEED_KEY_POLICY = key_policy(
    stmt("Allow", aws("arn:aws:iam::444455556666:root"), "kms:*",
         Sid="Enable IAM User Permissions"),
    stmt("Allow", aws("arn:aws:iam::111122223333:root"), [
        "kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
        Sid="Allow an external account to use this KMS key"),
)  # fmt: skip
SEED_IAM = iam(
    allow(
        ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"],
        SEED_KEY,
    )
)
BOB_SESSION = "arn:aws:sts::111122223333:assumed-role/ExampleRole/bob-session"


def _seed(action: str, identity: list[tuple[str, PolicyDocument]]) -> Decision:
    from hsmbridge.policy.evaluation import RequestFacts

    return decide_resource_access(
        RequestFacts(
            action, SEED_KEY, BOB_SESSION, "111122223333", "AssumedRole",
            "arn:aws:iam::111122223333:role/ExampleRole",
        ),
        resource_account="444455556666",
        resource_policy=SEED_KEY_POLICY,
        resource_label="key policy",
        identity_policies=identity,
        session_policy=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "action",
    ["kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
     "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"],
)  # fmt: skip
def test_seed_cross_account_example_allows_with_both_sides(action: str) -> None:
    decision = _seed(action, [("inline policy kms of role/ExampleRole", SEED_IAM)])
    assert decision.allowed
    assert decision.decided_by == (
        "key policy statement 'Allow an external account to use this KMS key' and "
        "inline policy kms of role/ExampleRole statement 0"
    )


def test_seed_cross_account_example_needs_the_iam_policy() -> None:
    decision = _seed("kms:Encrypt", [])
    assert not decision.allowed
    assert decision.message(BOB_SESSION, "kms:Encrypt", SEED_KEY) == (
        f"User: {BOB_SESSION} is not authorized to perform: kms:Encrypt on resource: {SEED_KEY} "
        "because no identity-based policy allows the kms:Encrypt action"
    )


@pytest.mark.parametrize("action", ["kms:ScheduleKeyDeletion", "kms:Sign", "kms:CreateGrant"])
def test_seed_cross_account_example_other_actions_are_refused(action: str) -> None:
    wide = iam(allow("kms:*"))
    decision = _seed(action, [("arn:aws:iam::111122223333:policy/Wide", wide)])
    assert not decision.allowed
    assert decision.reason == f"because no resource-based policy allows the {action} action"


# --- what decided, for the audit trail ----------------------------------------------------------


def _by(
    caller: str, kp: str, ids: str, session: str | None = None, grant: str | None = None
) -> str:
    return _decide(caller, kp, ids, session=session, action=E, ctx="-", grant=grant).decided_by


def test_decided_by_names_the_statement() -> None:
    assert _by("alice", "alice", "none") == "key policy statement 'Alice'"
    assert _by("root", "default", "none") == "key policy statement 'Enable IAM User Permissions'"
    assert _by("alice", "default", "enc") == f"IAM policy arn:aws:iam::{OWN}:policy/P0 statement 0"
    assert _by("dave", "dave", "none") == "key policy statement 0"
    assert _by("alice", "dave", "none", grant="g1") == "grant g1"
    assert _by("alice", "deny_all", "all") == "explicit deny in key policy statement 'DenyAll'"
    assert _by("alice", "default", "deny") == (
        f"explicit deny in IAM policy arn:aws:iam::{OWN}:policy/P1 statement 0"
    )
    assert _by("session", "default", "enc", "deny") == (
        "explicit deny in session policy statement 1"
    )
    assert _by("alice", "dave", "all") == "no applicable policy"


def test_message_without_a_resource() -> None:
    decision = Decision(False, "no applicable policy", NO_ID.format(action="kms:ListKeys"))
    assert decision.message(ALICE, "kms:ListKeys", None) == (
        f"User: {ALICE} is not authorized to perform: kms:ListKeys "
        "because no identity-based policy allows the kms:ListKeys action"
    )


def test_no_key_policy_at_all_is_no_resource_policy() -> None:
    decision = decide_resource_access(
        facts("root", E), resource_account=OWN, resource_policy=None, resource_label="key policy",
        identity_policies=[], session_policy=None,
    )  # fmt: skip
    assert not decision.allowed
    assert decision.reason == NO_RES.format(action=E)


# --- IAM-only actions ---------------------------------------------------------------------------

# fmt: off
IDENTITY_ONLY: list[tuple[str, str, str | None, str, str]] = [
    # caller     IAM       session  action               expected
    ("root",     "none",   None,    "kms:CreateKey",     OK),
    ("root",     "none",   None,    "kms:ListKeys",      OK),
    ("alice",    "none",   None,    "kms:CreateKey",     NO_ID),
    ("alice",    "all",    None,    "kms:CreateKey",     OK),
    ("alice",    "enc",    None,    "kms:CreateKey",     NO_ID),
    ("alice",    "deny",   None,    "kms:CreateKey",     OK),
    ("alice",    "deny",   None,    "kms:Encrypt",       DENY_ID),
    ("session",  "all",    None,    "kms:ListKeys",      OK),
    ("session",  "all",    "enc",   "kms:ListKeys",      NO_SESS),
    ("session",  "all",    "deny",  "kms:ListKeys",      DENY_SESS),
    ("session",  "none",   "enc",   "kms:Encrypt",       NO_ID),
    ("carol",    "all",    None,    "kms:CreateCustomKeyStore", OK),
    ("alice",    "gen",    None,    "kms:GenerateRandom", NO_ID),
]
# fmt: on


@pytest.mark.parametrize(("caller", "ids", "session", "action", "expected"), IDENTITY_ONLY)
def test_identity_only(
    caller: str, ids: str, session: str | None, action: str, expected: str
) -> None:
    decision = decide_identity_only(
        facts(caller, action, "*"),
        identity_policies=[(f"P{i}", d) for i, d in enumerate(IDENTITY[ids])],
        session_policy=SESSIONS[session],
    )
    if expected == OK:
        assert decision.allowed, decision
    else:
        assert not decision.allowed, decision
        assert decision.reason == expected.format(action=action)


# --- role trust policies (sts:AssumeRole) -------------------------------------------------------

TARGET = f"arn:aws:iam::{OWN}:role/target"
ASSUME = [iam(allow("sts:AssumeRole", TARGET))]
TRUSTS = {
    "alice": trust(stmt("Allow", aws(ALICE), "sts:AssumeRole")),
    "own_root": trust(stmt("Allow", aws(f"arn:aws:iam::{OWN}:root"), "sts:AssumeRole")),
    "ext_root": trust(stmt("Allow", aws(EXT), "sts:AssumeRole")),
    "carol": trust(stmt("Allow", aws(CAROL), "sts:AssumeRole")),
    "ext_role": trust(stmt("Allow", aws(EXT_ROLE), "sts:AssumeRole")),
}

# fmt: off
TRUST_CASES: list[tuple[str, str, bool, str]] = [
    # caller        trust       IAM allows AssumeRole   expected
    ("alice",       "alice",    False,                  OK),
    ("bob",         "alice",    True,                   NO_RES),
    ("alice",       "own_root", False,                  NO_ID),
    ("alice",       "own_root", True,                   OK),
    ("root",        "own_root", False,                  OK),
    ("carol",       "ext_root", True,                   OK),
    ("carol",       "ext_root", False,                  NO_ID),
    ("carol",       "carol",    False,                  NO_ID),
    ("carol",       "carol",    True,                   OK),
    ("ext_session", "ext_role", True,                   OK),
    ("ext_session", "ext_role", False,                  NO_ID),
    ("carol",       "own_root", True,                   NO_RES),
]
# fmt: on


@pytest.mark.parametrize(("caller", "trust_name", "iam_allows", "expected"), TRUST_CASES)
def test_trust_policy(caller: str, trust_name: str, iam_allows: bool, expected: str) -> None:
    decision = decide_resource_access(
        facts(caller, "sts:AssumeRole", TARGET),
        resource_account=OWN,
        resource_policy=TRUSTS[trust_name],
        resource_label=f"trust policy of {TARGET}",
        identity_policies=[("P", d) for d in (ASSUME if iam_allows else [])],
        session_policy=None,
        cross_account_actions=frozenset({"sts:AssumeRole"}),
    )
    if expected == OK:
        assert decision.allowed, decision
    else:
        assert not decision.allowed, decision
        assert decision.reason == expected.format(action="sts:AssumeRole")
