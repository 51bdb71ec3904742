"""Evaluate one policy document against one request: which statements allow or deny it.

Owns: `RequestFacts` (what a request is, in policy terms), statement matching (Principal and
NotPrincipal, Action and NotAction, Resource and NotResource, Condition), and the per-document
compiled form that keeps evaluation cheap: a document is compiled once, on first use, and then
evaluated without parsing or compiling anything. Combining several documents into a decision is
`decision`'s job. Must not import anything above `errors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from hsmbridge.policy.conditions import CompiledCondition, Values, compile_condition
from hsmbridge.policy.document import PolicyDocument, Principals, Statement
from hsmbridge.policy.matching import (
    POLICY_VARIABLES_VERSION,
    Template,
    arn_match,
    pattern_match,
    root_account,
    wildcard_match,
)

ConditionValue = str | bool | int | float | datetime | Sequence[str]

_DIRECT: Final = 2
_NAMES_CALLER: Final = 3
_VIA_ACCOUNT: Final = 1


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """A request as policies see it. `keys` are the request's condition keys (names compare
    case-insensitively); aws:PrincipalArn, aws:PrincipalAccount and aws:PrincipalType come
    from the fields unless `keys` sets them."""

    action: str  # "kms:Encrypt", "sts:AssumeRole"
    resource: str  # resource ARN, or "*" for actions without a resource
    principal_arn: str  # user, account root, assumed-role session ARN, or a service name
    principal_account: str
    principal_type: str  # "Account" | "User" | "AssumedRole" | "AWSService"
    role_arn: str | None = None  # the role of an assumed-role session
    keys: Mapping[str, ConditionValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match:
    """A statement that applies to the request."""

    effect: str
    policy: str  # the label passed to evaluate()
    sid: str | None
    index: int  # 0-based statement index
    # The Principal matched only through the caller's account (its root ARN or account id):
    # the resource policy then delegates to the caller account's IAM policies.
    via_account: bool
    # The Principal named the caller's own ARN (not its role, account or "*"): a session
    # policy does not limit such an allow (AWS's rule for resource policies naming a session).
    names_caller: bool = False

    def describe(self) -> str:
        """How the audit trail names this statement."""
        where = f"'{self.sid}'" if self.sid else str(self.index)
        return f"{self.policy} statement {where}"


@dataclass(frozen=True, slots=True)
class PolicyResult:
    deny: Match | None
    allow: Match | None  # the strongest allow: naming the caller, then direct, then via account


# --- compiled form ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CompiledPrincipals:
    wildcard: bool
    exact: frozenset[str]  # user, role, session ARNs, service and federated names
    accounts: frozenset[str]  # accounts named by root ARN or id

    @staticmethod
    def of(principals: Principals) -> _CompiledPrincipals:
        exact: set[str] = set(principals.services) | set(principals.federated)
        accounts: set[str] = set()
        for arn in principals.aws:
            account = root_account(arn)
            if account is not None:
                accounts.add(account)
            else:
                exact.add(arn)
        return _CompiledPrincipals(principals.wildcard, frozenset(exact), frozenset(accounts))

    def strength(self, facts: RequestFacts) -> int:
        """0 when the principal is not named; else how it is named (see the constants)."""
        if facts.principal_arn in self.exact:
            return _NAMES_CALLER
        if self.wildcard or (facts.role_arn is not None and facts.role_arn in self.exact):
            return _DIRECT
        if facts.principal_type != "AWSService" and facts.principal_account in self.accounts:
            return _VIA_ACCOUNT
        return 0


@dataclass(frozen=True, slots=True)
class _CompiledStatement:
    index: int
    sid: str | None
    allow: bool
    principal: _CompiledPrincipals | None
    not_principal: _CompiledPrincipals | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[Template, ...] | None
    not_resources: tuple[Template, ...] | None
    conditions: tuple[CompiledCondition, ...]


def _compile_statement(index: int, statement: Statement, variables: bool) -> _CompiledStatement:
    def templates(items: tuple[str, ...] | None) -> tuple[Template, ...] | None:
        if items is None:
            return None
        return tuple(Template.parse(item, variables=variables) for item in items)

    return _CompiledStatement(
        index=index,
        sid=statement.sid,
        allow=statement.effect == "Allow",
        principal=_CompiledPrincipals.of(statement.principal) if statement.principal else None,
        not_principal=(
            _CompiledPrincipals.of(statement.not_principal) if statement.not_principal else None
        ),
        actions=statement.actions,
        not_actions=statement.not_actions,
        resources=templates(statement.resources),
        not_resources=templates(statement.not_resources),
        conditions=tuple(
            compile_condition(c.operator, c.key, c.values, variables=variables)
            for c in statement.conditions
        ),
    )


def _compiled(policy: PolicyDocument) -> tuple[_CompiledStatement, ...]:
    cached = policy._compiled
    if cached is None:
        variables = policy.version == POLICY_VARIABLES_VERSION
        cached = tuple(_compile_statement(i, s, variables) for i, s in enumerate(policy.statements))
        # Two threads may both compile a new document; they store equal values, so no lock.
        object.__setattr__(policy, "_compiled", cached)
    result: tuple[_CompiledStatement, ...] = cached
    return result


# --- evaluation ---------------------------------------------------------------------------------


class _Context:
    """The request's condition keys, looked up case-insensitively, and the variable resolver."""

    __slots__ = ("facts", "keys")

    def __init__(self, facts: RequestFacts) -> None:
        self.facts = facts
        keys: dict[str, ConditionValue] = {
            "aws:principalarn": facts.role_arn or facts.principal_arn,
            "aws:principalaccount": facts.principal_account,
            "aws:principaltype": facts.principal_type,
        }
        for name, value in facts.keys.items():
            keys[name.lower()] = value
        self.keys = keys

    def values(self, key: str) -> Values | None:
        value = self.keys.get(key)
        if value is None:
            return None
        if isinstance(value, str | bool | int | float | datetime):
            return (value,)
        return tuple(value)

    def resolve(self, name: str) -> str | None:
        value = self.keys.get(name.lower())
        # A multivalued key cannot stand in for a single variable.
        if value is None or not isinstance(value, str | bool | int | float):
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


def _actions_match(patterns: tuple[str, ...], action: str) -> bool:
    return any(wildcard_match(p, action, ignore_case=True) for p in patterns)


def _resources_match(templates: tuple[Template, ...], resource: str, ctx: _Context) -> bool:
    for template in templates:
        if template.static is not None:
            if arn_match(template.static, resource):
                return True
            continue
        want = template.resolve(ctx.resolve, as_pattern=True)
        if want is not None and pattern_match(want, resource, arn=True):
            return True
    return False


def _principal_strength(
    statement: _CompiledStatement, facts: RequestFacts, resource_policy: bool
) -> int:
    if not resource_policy:
        return _DIRECT  # an identity policy applies to the identity it is attached to
    if statement.principal is not None:
        return statement.principal.strength(facts)
    if statement.not_principal is not None:
        return 0 if statement.not_principal.strength(facts) else _DIRECT
    return 0


def _action_applies(statement: _CompiledStatement, action: str) -> bool:
    if statement.actions is not None:
        return _actions_match(statement.actions, action)
    if statement.not_actions is not None:
        return not _actions_match(statement.not_actions, action)
    return False  # a key policy statement without Action has no effect


def _resource_applies(
    statement: _CompiledStatement, resource: str, ctx: _Context, implicit_resource: bool
) -> bool:
    if statement.resources is not None:
        return _resources_match(statement.resources, resource, ctx)
    if statement.not_resources is not None:
        return not _resources_match(statement.not_resources, resource, ctx)
    return implicit_resource


def _applies(
    statement: _CompiledStatement, facts: RequestFacts, ctx: _Context, implicit_resource: bool
) -> bool:
    return (
        _action_applies(statement, facts.action)
        and _resource_applies(statement, facts.resource, ctx, implicit_resource)
        and all(c.test(ctx.values(c.key), ctx.resolve) for c in statement.conditions)
    )


def evaluate(
    policy: PolicyDocument, facts: RequestFacts, *, label: str, resource_policy: bool
) -> PolicyResult:
    """The statements of `policy` that apply to the request: the first Deny, and the strongest
    Allow. With `resource_policy`, statements apply only to the principals they name; otherwise
    the policy belongs to the caller and Principal elements are ignored."""
    ctx = _Context(facts)
    deny: Match | None = None
    allow: Match | None = None
    best = 0
    for statement in _compiled(policy):
        if deny is not None and not statement.allow:
            continue
        if statement.allow and best == _NAMES_CALLER:
            continue
        strength = _principal_strength(statement, facts, resource_policy)
        if not strength or (statement.allow and strength <= best):
            continue
        if not _applies(statement, facts, ctx, policy._implicit_resource):
            continue
        match = Match(
            effect="Allow" if statement.allow else "Deny",
            policy=label,
            sid=statement.sid,
            index=statement.index,
            via_account=strength == _VIA_ACCOUNT,
            names_caller=resource_policy and strength == _NAMES_CALLER,
        )
        if statement.allow:
            allow, best = match, strength
        else:
            deny = match
    return PolicyResult(deny, allow)
