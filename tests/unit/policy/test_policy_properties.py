"""Properties of the decision that must hold for any request: without an Allow (or a grant) nothing
is allowed, and a matching explicit Deny never turns a denial into an allow."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmbridge.policy.decision import decide_identity_only, decide_resource_access
from hsmbridge.policy.document import PolicyDocument, parse_identity_policy, parse_key_policy
from hsmbridge.policy.evaluation import RequestFacts

ACCOUNTS = ["111122223333", "444455556666"]
ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ScheduleKeyDeletion", "kms:CreateGrant",
           "kms:DescribeKey", "kms:PutKeyPolicy"]  # fmt: skip
ACTION_PATTERNS = [*ACTIONS, "kms:*", "*", "kms:Gen*", "kms:?ncrypt", "kms:De*"]


@st.composite
def callers(draw: st.DrawFn) -> RequestFacts:
    account = draw(st.sampled_from(ACCOUNTS))
    kind = draw(st.sampled_from(["Account", "User", "AssumedRole", "AWSService"]))
    role = None
    if kind == "Account":
        arn = f"arn:aws:iam::{account}:root"
    elif kind == "User":
        arn = f"arn:aws:iam::{account}:user/{draw(st.sampled_from(['alice', 'bob']))}"
    elif kind == "AssumedRole":
        name = draw(st.sampled_from(["app", "ops"]))
        role = f"arn:aws:iam::{account}:role/{name}"
        arn = f"arn:aws:sts::{account}:assumed-role/{name}/s"
    else:
        arn, account = "logs.amazonaws.com", ""
    keys = draw(
        st.dictionaries(
            st.sampled_from(["kms:EncryptionContext:Dept", "aws:SourceIp", "k", "aws:username"]),
            st.sampled_from(["IT", "10.0.0.1", "alice", "x"]),
            max_size=3,
        )
    )
    resource = f"arn:aws:kms:us-east-1:{draw(st.sampled_from(ACCOUNTS))}:key/k1"
    return RequestFacts(draw(st.sampled_from(ACTIONS)), resource, arn, account, kind, role, keys)


PRINCIPALS: list[Any] = [
    "*",
    {"AWS": "*"},
    {"AWS": "111122223333"},
    {"AWS": "arn:aws:iam::444455556666:root"},
    {"AWS": "arn:aws:iam::111122223333:user/alice"},
    {"AWS": ["arn:aws:iam::111122223333:role/app", "arn:aws:iam::444455556666:user/bob"]},
    {"AWS": "arn:aws:sts::111122223333:assumed-role/app/s"},
    {"Service": "logs.amazonaws.com"},
]
CONDITIONS: list[dict[str, Any] | None] = [
    None,
    {"StringEquals": {"kms:EncryptionContext:Dept": "IT"}},
    {"StringNotEquals": {"k": "x"}},
    {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
    {"Null": {"k": "true"}},
    {"ForAllValues:StringLike": {"k": "*"}},
    {"StringEqualsIfExists": {"aws:username": "${aws:username}"}},
]
RESOURCES = ["*", "arn:aws:kms:*:111122223333:key/*", "arn:aws:kms:us-east-1:444455556666:key/k1"]


@st.composite
def statements(draw: st.DrawFn, effect: str, *, principal: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"Effect": effect}
    if principal:
        key = draw(st.sampled_from(["Principal", "NotPrincipal"]))
        out[key] = draw(st.sampled_from(PRINCIPALS))
    action_key = draw(st.sampled_from(["Action", "NotAction"]))
    out[action_key] = draw(st.lists(st.sampled_from(ACTION_PATTERNS), min_size=1, max_size=3))
    out[draw(st.sampled_from(["Resource", "NotResource"]))] = draw(st.sampled_from(RESOURCES))
    condition = draw(st.sampled_from(CONDITIONS))
    if condition is not None:
        out["Condition"] = condition
    return out


def _key_policy(body: list[dict[str, Any]]) -> PolicyDocument:
    return parse_key_policy(json.dumps({"Version": "2012-10-17", "Statement": body}))


def _iam(body: list[dict[str, Any]]) -> PolicyDocument:
    return parse_identity_policy({"Version": "2012-10-17", "Statement": body})


def _policies(data: st.DataObject, effect: str) -> tuple[PolicyDocument, list[PolicyDocument], Any]:
    kp = _key_policy(
        data.draw(st.lists(statements(effect, principal=True), min_size=1, max_size=3))
    )
    ids = [
        _iam(data.draw(st.lists(statements(effect, principal=False), min_size=1, max_size=2)))
        for _ in range(data.draw(st.integers(0, 2)))
    ]
    session = data.draw(st.none() | st.lists(statements(effect, principal=False), min_size=1,
                                        max_size=2).map(_iam))  # fmt: skip
    return kp, ids, session


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(facts=callers(), data=st.data())
def test_deny_only_policies_never_allow(facts: RequestFacts, data: st.DataObject) -> None:
    kp, ids, session = _policies(data, "Deny")
    named = [(f"P{i}", d) for i, d in enumerate(ids)]
    decision = decide_resource_access(
        facts,
        resource_account=data.draw(st.sampled_from(ACCOUNTS)),
        resource_policy=kp,
        resource_label="key policy",
        identity_policies=named,
        session_policy=session,
    )
    assert not decision.allowed, decision
    assert decision.reason
    if facts.principal_type != "Account":
        assert not decide_identity_only(
            facts, identity_policies=named, session_policy=session
        ).allowed


@SETTINGS
@given(facts=callers(), data=st.data())
def test_a_matching_deny_never_turns_a_denial_into_an_allow(
    facts: RequestFacts, data: st.DataObject
) -> None:
    effects = st.sampled_from(["Allow", "Deny"])
    account = data.draw(st.sampled_from(ACCOUNTS))
    kp_body = data.draw(st.lists(effects.flatmap(lambda e: statements(e, principal=True)),
                                 min_size=1, max_size=3))  # fmt: skip
    id_bodies = data.draw(
        st.lists(st.lists(effects.flatmap(lambda e: statements(e, principal=False)), min_size=1,
                          max_size=2), max_size=2)
    )  # fmt: skip
    grant = data.draw(st.none() | st.just("g1"))

    def decide(extra_key: list[dict[str, Any]], extra_iam: list[dict[str, Any]]) -> bool:
        ids = [_iam(b) for b in id_bodies]
        if extra_iam:
            ids.append(_iam(extra_iam))
        return decide_resource_access(
            facts,
            resource_account=account,
            resource_policy=_key_policy(kp_body + extra_key),
            resource_label="key policy",
            identity_policies=[(f"P{i}", d) for i, d in enumerate(ids)],
            session_policy=None,
            grant=grant,
        ).allowed

    before = decide([], [])
    deny_all_key = [{"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}]
    deny_action_iam = [{"Effect": "Deny", "Action": facts.action, "Resource": facts.resource}]
    extra = data.draw(st.sampled_from([(deny_all_key, []), ([], deny_action_iam)]))
    after = decide(*extra)
    assert not after  # the added Deny matches this request
    assert after <= before
    # and a random extra Deny, matching or not, never adds permissions
    random_deny = data.draw(statements("Deny", principal=True))
    assert decide([random_deny], []) <= before


@SETTINGS
@given(facts=callers(), data=st.data())
def test_no_allow_anywhere_and_no_grant_is_denied(facts: RequestFacts, data: st.DataObject) -> None:
    # Allow statements whose actions can never match: only Deny statements could apply.
    _, ids, session = _policies(data, "Deny")
    never = {"Effect": "Allow", "Principal": "*", "Action": "sqs:Nothing", "Resource": "*"}
    kp = _key_policy([never])
    decision = decide_resource_access(
        facts,
        resource_account=facts.principal_account or ACCOUNTS[0],
        resource_policy=kp,
        resource_label="key policy",
        identity_policies=[(f"P{i}", d) for i, d in enumerate(ids)],
        session_policy=session,
    )
    assert not decision.allowed
