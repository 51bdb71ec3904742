"""Combine policy results into one authorization decision, the way AWS KMS does.

Owns: `Decision` (allowed or not, which policy decided, and the AccessDenied wording), and the
two ways of deciding: on a resource that has its own policy (a KMS key and its key policy, an IAM
role and its trust policy), and on actions that IAM policies alone decide. The rules:
an explicit deny anywhere wins; in the resource's account the resource policy must allow the
principal directly, or delegate to the account (naming its root) with an IAM policy allowing
too, or a grant must allow; across accounts only listed actions work, and the resource policy and
the caller's IAM policies must both allow, unless a grant does. A session policy limits the
identity side and any resource-policy allow that does not name the session itself.
Must not import anything above `errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from hsmbridge.policy.document import PolicyDocument
from hsmbridge.policy.evaluation import Match, PolicyResult, RequestFacts, evaluate

CROSS_ACCOUNT_ACTIONS: Final[frozenset[str]] = frozenset(
    {
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:GenerateDataKeyPair",
        "kms:GenerateDataKeyPairWithoutPlaintext",
        "kms:GenerateMac",
        "kms:VerifyMac",
        "kms:Sign",
        "kms:Verify",
        "kms:GetPublicKey",
        "kms:DescribeKey",
        "kms:CreateGrant",
        "kms:ListGrants",
        "kms:RetireGrant",
        "kms:RevokeGrant",
        "kms:GetKeyRotationStatus",
        "kms:DeriveSharedSecret",
    }
)

SESSION_POLICY_LABEL: Final = "session policy"
_DENY_RESOURCE: Final = "with an explicit deny in a resource-based policy"
_DENY_IDENTITY: Final = "with an explicit deny in an identity-based policy"
_DENY_SESSION: Final = "with an explicit deny in a session policy"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    decided_by: str  # for the audit trail: the deciding policy and statement
    reason: str  # the tail of AccessDenied's message; "" when allowed

    def message(self, principal_arn: str, action: str, resource: str | None) -> str:
        """AccessDenied's message in AWS's current wording."""
        where = f" on resource: {resource}" if resource is not None else ""
        return f"User: {principal_arn} is not authorized to perform: {action}{where} {self.reason}"


def _no_resource(action: str) -> str:
    return f"because no resource-based policy allows the {action} action"


def _no_identity(action: str) -> str:
    return f"because no identity-based policy allows the {action} action"


def _no_session(action: str) -> str:
    return f"because no session policy allows the {action} action"


def _identity_label(label: str) -> str:
    return f"IAM policy {label}" if label.startswith("arn:") else label


def _deny(match: Match, reason: str) -> Decision:
    return Decision(False, f"explicit deny in {match.describe()}", reason)


@dataclass(frozen=True, slots=True)
class _IdentitySide:
    """The caller's own policies: whether they allow, and if not, why not."""

    deny: Decision | None
    allow: Match | None
    root: bool
    session: PolicyResult | None

    @property
    def session_allows(self) -> bool:
        return self.session is None or self.session.allow is not None

    @property
    def allows(self) -> bool:
        return (self.root or self.allow is not None) and self.session_allows

    def refusal(self, action: str) -> str:
        if not self.root and self.allow is None:
            return _no_identity(action)
        return _no_session(action)

    def decided_by(self) -> str:
        if self.allow is not None:
            return self.allow.describe()
        return "the account root's implicit permissions"


def _identity_side(
    facts: RequestFacts,
    identity_policies: Sequence[tuple[str, PolicyDocument]],
    session_policy: PolicyDocument | None,
) -> _IdentitySide:
    allow: Match | None = None
    for label, doc in identity_policies:
        result = evaluate(doc, facts, label=_identity_label(label), resource_policy=False)
        if result.deny is not None:
            return _IdentitySide(_deny(result.deny, _DENY_IDENTITY), None, False, None)
        if allow is None:
            allow = result.allow
    session = None
    if session_policy is not None:
        session = evaluate(session_policy, facts, label=SESSION_POLICY_LABEL, resource_policy=False)
        if session.deny is not None:
            return _IdentitySide(_deny(session.deny, _DENY_SESSION), None, False, session)
    return _IdentitySide(None, allow, facts.principal_type == "Account", session)


def decide_resource_access(
    facts: RequestFacts,
    *,
    resource_account: str,
    resource_policy: PolicyDocument | None,
    resource_label: str,
    identity_policies: Sequence[tuple[str, PolicyDocument]],
    session_policy: PolicyDocument | None,
    grant: str | None = None,
    cross_account_actions: frozenset[str] = CROSS_ACCOUNT_ACTIONS,
) -> Decision:
    """May the caller perform `facts.action` on a resource with its own policy? `grant` is the
    id of a grant that allows the request, if the caller found one."""
    resource = (
        evaluate(resource_policy, facts, label=resource_label, resource_policy=True)
        if resource_policy is not None
        else PolicyResult(None, None)
    )
    if resource.deny is not None:
        return _deny(resource.deny, _DENY_RESOURCE)
    identity = _identity_side(facts, identity_policies, session_policy)
    if identity.deny is not None:
        return identity.deny
    if facts.principal_type == "AWSService":
        decision = _service(facts, resource.allow)
    elif facts.principal_account == resource_account:
        decision = _same_account(facts, resource.allow, identity)
    elif facts.action not in cross_account_actions:
        return Decision(
            False, f"{facts.action} cannot be used across accounts", _no_resource(facts.action)
        )
    else:
        decision = _cross_account(facts, resource.allow, identity)
    # A grant is the other way in, once no policy denies.
    if not decision.allowed and grant is not None:
        return Decision(True, f"grant {grant}", "")
    return decision


def _service(facts: RequestFacts, allow: Match | None) -> Decision:
    # A service principal has no IAM policies: only the resource policy can let it in.
    if allow is not None and not allow.via_account:
        return Decision(True, allow.describe(), "")
    return Decision(False, "no applicable policy", _no_resource(facts.action))


def _same_account(facts: RequestFacts, allow: Match | None, identity: _IdentitySide) -> Decision:
    action = facts.action
    if allow is None:
        return Decision(False, "no applicable policy", _no_resource(action))
    if not allow.via_account:
        if allow.names_caller or identity.session_allows:
            return Decision(True, allow.describe(), "")
        return Decision(
            False, f"{allow.describe()}, limited by the session policy", _no_session(action)
        )
    if identity.allows:
        return Decision(True, allow.describe() if identity.root else identity.decided_by(), "")
    return Decision(
        False,
        f"{allow.describe()} delegates to IAM, which does not allow",
        identity.refusal(action),
    )


def _cross_account(facts: RequestFacts, allow: Match | None, identity: _IdentitySide) -> Decision:
    action = facts.action
    if allow is None:
        return Decision(False, "no applicable policy", _no_resource(action))
    if identity.allows:
        return Decision(True, f"{allow.describe()} and {identity.decided_by()}", "")
    return Decision(
        False,
        f"{allow.describe()} needs the caller's IAM policies to allow too",
        identity.refusal(action),
    )


def decide_identity_only(
    facts: RequestFacts,
    *,
    identity_policies: Sequence[tuple[str, PolicyDocument]],
    session_policy: PolicyDocument | None,
) -> Decision:
    """Actions without a resource policy (CreateKey, ListKeys, custom key stores, ...): the
    account root is allowed implicitly; anyone else needs an IAM allow (and a session-policy
    allow, when there is a session policy) and no explicit deny."""
    identity = _identity_side(facts, identity_policies, session_policy)
    if identity.deny is not None:
        return identity.deny
    if identity.allows:
        return Decision(True, identity.decided_by(), "")
    return Decision(False, "no applicable policy", identity.refusal(facts.action))
