"""Authorization: may this caller perform this KMS action, on this key or account-wide?

Owns: `AccessControl`, the one decision every service operation asks for before it acts, whichever
edge (HTTP, CLI, console) the request came through. It gathers what AWS evaluates together: the
key policy (parsed once per policy text), the caller's IAM policies (from the account's
`iam/ACCOUNT.json`, parsed once per file change), the session policy of temporary credentials, and
the key's grants (read only when the policies do not allow, so the common path never touches
them). It builds the request's condition keys, lets `policy.decision` decide, records the decision
in the request's audit annotations and raises AccessDeniedException in AWS's current wording.
It also owns the key-policy checks AWS makes on write: principals must exist, and the lockout
safety check. Must not import protocol, http or cli.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from hsmbridge.errors import (
    AccessDeniedException,
    InvalidGrantTokenException,
    MalformedPolicyDocumentException,
)
from hsmbridge.identity.credentials import caller_principal_type as principal_type
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.metadata.store import MetadataStore
from hsmbridge.model import Grant, KeyRecord
from hsmbridge.policy.decision import Decision, decide_identity_only, decide_resource_access
from hsmbridge.policy.document import (
    PolicyDocument,
    PolicyDocumentError,
    parse_identity_policy,
    parse_key_policy,
)
from hsmbridge.policy.evaluation import ConditionValue, RequestFacts
from hsmbridge.request import RequestContext
from hsmbridge.trail import context as audit_context

Context = Mapping[str, str]
Clock = Callable[[], float]

_POLICY_CACHE_SIZE: Final = 1024
_DECISION_CACHE_SIZE: Final = 8192
_VOLATILE_KEYS: Final = frozenset({"aws:currenttime", "aws:epochtime", "kms:resourcealiases"})
# The operations whose model lists InvalidGrantTokenException: only they check GrantTokens (KMS
# answers DescribeKey, say, whatever tokens it is sent).
_GRANT_TOKEN_ACTIONS: Final = frozenset(
    {
        "kms:CreateGrant",
        "kms:Decrypt",
        "kms:Encrypt",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:RetireGrant",
    }
)
GRANT_TOKEN_PREFIX: Final = b"hsmbridge-grant/v1:"
# Operations whose requests carry an encryption context: the kms:EncryptionContext* keys and
# grant constraints apply to them.
_CONTEXT_ACTIONS: Final = frozenset(
    {
        "kms:Encrypt",
        "kms:Decrypt",
        "kms:ReEncryptFrom",
        "kms:ReEncryptTo",
        "kms:GenerateDataKey",
        "kms:GenerateDataKeyWithoutPlaintext",
        "kms:CreateGrant",
    }
)


def encode_grant_token(grant_id: str, nonce: bytes) -> str:
    """A grant token: opaque to clients, naming its grant (RetireGrant accepts it alone)."""
    return base64.urlsafe_b64encode(GRANT_TOKEN_PREFIX + grant_id.encode() + b":" + nonce).decode()


def decode_grant_token(token: str) -> str:
    """The grant id a token names; InvalidGrantTokenException for anything we did not issue."""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if not raw.startswith(GRANT_TOKEN_PREFIX):
        raise InvalidGrantTokenException("The grant token is not valid.")
    grant_id, sep, _ = raw[len(GRANT_TOKEN_PREFIX) :].partition(b":")
    if not sep or len(grant_id) != 64:
        raise InvalidGrantTokenException("The grant token is not valid.")
    return grant_id.decode("ascii", "replace")


def grant_allows(grant: Grant, action: str, context: Context | None) -> bool:
    """Does `grant` cover `action` with this encryption context? Constraint keys compare
    case-insensitively and values exactly."""
    if action.removeprefix("kms:") not in grant.operations:
        return False
    constraints = grant.constraints
    if constraints is None or action not in _CONTEXT_ACTIONS or action == "kms:CreateGrant":
        return True
    given = {k.lower(): v for k, v in (context or {}).items()}
    if constraints.equals is not None:
        return given == {k.lower(): v for k, v in constraints.equals}
    if constraints.subset is not None:
        return all(given.get(k.lower()) == v for k, v in constraints.subset)
    return True


def _volatile(doc: PolicyDocument) -> bool:
    """Can this document decide differently for the same caller, key and request inputs? Time
    conditions can, and kms:ResourceAliases reads the key's aliases, which the decision cache's
    key does not hold."""
    for statement in doc.statements:
        for condition in statement.conditions:
            operator = condition.operator.lower()
            operator = operator.removeprefix("foranyvalue:").removeprefix("forallvalues:")
            if condition.key.lower() in _VOLATILE_KEYS or operator.startswith("date"):
                return True
    return False


class _PolicyCache:
    """Parsed policy documents by their text: a key policy is parsed once per change."""

    def __init__(self, parse: Callable[[str], PolicyDocument]) -> None:
        self._parse = parse
        self._docs: OrderedDict[str, tuple[PolicyDocument, bool]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, text: str) -> PolicyDocument:
        return self.entry(text)[0]

    def entry(self, text: str) -> tuple[PolicyDocument, bool]:
        """The parsed document and whether it is `_volatile`."""
        with self._lock:
            found = self._docs.get(text)
            if found is not None:
                self._docs.move_to_end(text)
                return found
        doc = self._parse(text)
        entry = (doc, _volatile(doc))
        with self._lock:
            self._docs[text] = entry
            while len(self._docs) > _POLICY_CACHE_SIZE:
                self._docs.popitem(last=False)
        return entry


@dataclass(frozen=True, slots=True)
class _Identity:
    """A caller's IAM side for one IAM generation: its policies, parsed once per file change."""

    policies: list[tuple[str, PolicyDocument]]
    volatile: bool
    uses_resource_aliases: bool


class AccessControl:
    def __init__(
        self,
        iam: IamDirectory,
        meta: MetadataStore,
        *,
        clock: Clock,
        aliases_of: Callable[[str], Sequence[str]] | None = None,
    ) -> None:
        self._iam = iam
        self._meta = meta
        self._clock = clock
        self._aliases_of = aliases_of
        self._key_policies = _PolicyCache(parse_key_policy)
        self._session_policies = _PolicyCache(parse_identity_policy)
        # Allowing decisions made by policies alone, by everything they depend on (see
        # _decision_key): the hot path evaluates a caller's policies once per change, not per
        # request. Grant-based decisions are never cached (a grant can be retired any time).
        self._decisions: dict[tuple[object, ...], Decision] = {}
        self._identities: dict[tuple[str, str | None, int], _Identity] = {}

    @property
    def iam(self) -> IamDirectory:
        return self._iam

    @iam.setter
    def iam(self, directory: IamDirectory) -> None:
        """Swap the IAM directory (tests); cached decisions were made with the old one."""
        self._iam = directory
        self._decisions.clear()
        self._identities.clear()

    # -- decisions ----------------------------------------------------------------------------
    def authorize(
        self,
        caller: RequestContext,
        action: str,
        resource: str | None = None,
        *,
        keys: Mapping[str, ConditionValue] | None = None,
    ) -> None:
        """Actions without a key (CreateKey, ListKeys, custom key stores, ...): IAM alone."""
        if caller.is_service:
            return
        facts = self._facts(caller, action, resource or "*", keys or {})
        decision = decide_identity_only(
            facts,
            identity_policies=self._identity_policies(caller),
            session_policy=self._session_policy(caller),
        )
        self._conclude(caller, action, resource, decision)

    def authorize_key(
        self,
        caller: RequestContext,
        action: str,
        key: KeyRecord,
        *,
        context: Context | None = None,
        keys: Mapping[str, ConditionValue] | None = None,
        request_alias: str | None = None,
    ) -> Decision:
        """An action on a key: key policy, IAM policies, session policy and grants together.
        `context` is the request's encryption context. Returns the allowing decision (its
        `decided_by` tells CreateGrant whether a grant was the only way in)."""
        if caller.is_service:
            return Decision(True, "the service itself", "")
        if action in _GRANT_TOKEN_ACTIONS:
            self._check_grant_tokens(caller)
        alias = request_alias or audit_context.requested_alias()
        found = self._decision_key(caller, action, key, context=context, alias=alias, keys=keys)
        cache_key: tuple[object, ...] | None = found
        cached: Decision | None
        try:
            cached = self._decisions.get(found)
        except TypeError:  # a list-valued condition key: not cacheable, evaluate every time
            cache_key, cached = None, None
        if cached is not None:
            self._conclude(caller, action, key.arn, cached)
            return cached
        facts = self._facts(
            caller,
            action,
            key.arn,
            self._key_keys(caller, key, action, context=context, request_alias=alias, extra=keys),
        )
        decision = self._decide_key(caller, facts, key, grant=None)
        if decision.allowed and cache_key is not None and self._cacheable(caller, key):
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()  # crude but bounded; refilled by the next requests
            self._decisions[cache_key] = decision
        if not decision.allowed:
            grant = self.matching_grant(caller, action, key, context)
            if grant is not None:
                decision = self._decide_key(caller, facts, key, grant=grant.grant_id)
        self._conclude(caller, action, key.arn, decision)
        return decision

    def allows_key(
        self, caller: RequestContext, action: str, key: KeyRecord, policy: PolicyDocument
    ) -> bool:
        """Would `policy`, as `key`'s key policy, let `caller` perform `action`? (The lockout
        safety check asks this of a new policy before it is stored.)"""
        facts = self._facts(
            caller,
            action,
            key.arn,
            self._key_keys(caller, key, action, context=None, request_alias=None, extra=None),
        )
        return decide_resource_access(
            facts,
            resource_account=key.account_id,
            resource_policy=policy,
            resource_label="key policy",
            identity_policies=self._identity_policies(caller),
            session_policy=self._session_policy(caller),
        ).allowed

    def matching_grant(
        self, caller: RequestContext, action: str, key: KeyRecord, context: Context | None
    ) -> Grant | None:
        grantees = tuple(a for a in (caller.principal_arn, caller.role_arn) if a)
        for grant in self._meta.grants_for(key.key_id, grantees):
            if grant_allows(grant, action, context):
                return grant
        return None

    # -- key policies on write ----------------------------------------------------------------
    def check_new_key_policy(
        self,
        caller: RequestContext,
        key: KeyRecord,
        policy_text: str,
        *,
        bypass_lockout_check: bool,
    ) -> PolicyDocument:
        """CreateKey's and PutKeyPolicy's checks: a valid document whose principals
        exist and which still lets the caller change it, unless the caller bypasses that."""
        doc = self._key_policies.get(policy_text)
        for principal in sorted(doc.aws_principals()):
            if principal != "*" and not self.iam.principal_exists(principal):
                raise MalformedPolicyDocumentException(
                    "Policy contains a statement with one or more invalid principals."
                )
        lockout_checked = not bypass_lockout_check and not caller.is_service
        if lockout_checked and not self.allows_key(caller, "kms:PutKeyPolicy", key, doc):
            raise MalformedPolicyDocumentException(
                "The new key policy will not allow you to update the key policy in the future."
            )
        return doc

    # -- inputs -------------------------------------------------------------------------------
    def _decide_key(
        self, caller: RequestContext, facts: RequestFacts, key: KeyRecord, *, grant: str | None
    ) -> Decision:
        return decide_resource_access(
            facts,
            resource_account=key.account_id,
            resource_policy=self._key_policies.get(key.policy),
            resource_label="key policy",
            identity_policies=self._identity_policies(caller),
            session_policy=self._session_policy(caller),
            grant=grant,
        )

    def _decision_key(
        self,
        caller: RequestContext,
        action: str,
        key: KeyRecord,
        *,
        context: Context | None,
        alias: str | None,
        keys: Mapping[str, ConditionValue] | None,
    ) -> tuple[object, ...]:
        """Everything a policy-based decision on `key` depends on. Cheap on purpose: it is
        computed for every request; whether the decision may be cached at all (`_cacheable`) is
        asked only on a miss."""
        return (
            caller.principal_arn,
            caller.account_id,
            caller.role_arn,
            caller.session_policy,
            caller.via_service,
            caller.source_ip,
            caller.secure_transport,
            action,
            key.key_id,
            key.policy,
            key.tags,
            tuple(sorted(context.items())) if context else (),
            alias,
            tuple(sorted(keys.items())) if keys else (),
            self.iam.generation(),
        )

    def _cacheable(self, caller: RequestContext, key: KeyRecord) -> bool:
        """No policy behind this decision reads the time or the key's aliases."""
        if self._identity(caller).volatile or self._key_policies.entry(key.policy)[1]:
            return False
        return not self._session_entry(caller)[1]

    def _identity(self, caller: RequestContext) -> _Identity:
        index = (caller.principal_arn, caller.role_arn, self.iam.generation())
        found = self._identities.get(index)
        if found is None:
            named = self.iam.identity_policies(caller.principal_arn, caller.role_arn)
            policies = [(p.label, p.document) for p in named]
            found = _Identity(
                policies,
                volatile=any(_volatile(doc) for _, doc in policies),
                uses_resource_aliases=any(
                    condition.key.lower() == "kms:resourcealiases"
                    for _, doc in policies
                    for statement in doc.statements
                    for condition in statement.conditions
                ),
            )
            if len(self._identities) >= _POLICY_CACHE_SIZE:
                self._identities.clear()
            self._identities[index] = found
        return found

    def _identity_policies(self, caller: RequestContext) -> list[tuple[str, PolicyDocument]]:
        return self._identity(caller).policies

    def _session_entry(self, caller: RequestContext) -> tuple[PolicyDocument | None, bool]:
        if caller.session_policy is None:
            return None, False
        try:
            return self._session_policies.entry(caller.session_policy)
        except PolicyDocumentError:  # STS validated it when it issued the session
            return None, False

    def _session_policy(self, caller: RequestContext) -> PolicyDocument | None:
        return self._session_entry(caller)[0]

    def _check_grant_tokens(self, caller: RequestContext) -> None:
        # Grants take effect at once here, so a token adds nothing but must still be one we
        # issued: KMS answers InvalidGrantTokenException for a malformed token.
        for token in caller.grant_tokens:
            decode_grant_token(token)

    def _facts(
        self,
        caller: RequestContext,
        action: str,
        resource: str,
        keys: Mapping[str, ConditionValue],
    ) -> RequestFacts:
        now = self._clock()
        common: dict[str, ConditionValue] = {
            "kms:CallerAccount": caller.account_id,
            "aws:CurrentTime": datetime.fromtimestamp(now, UTC),
            "aws:EpochTime": int(now),
            "aws:SecureTransport": caller.secure_transport,
        }
        if caller.source_ip:
            common["aws:SourceIp"] = caller.source_ip
        if caller.via_service:
            common["kms:ViaService"] = caller.via_service
        user = self.iam.user(caller.principal_arn)
        if user is not None:
            common["aws:username"] = user.name
            common["aws:userid"] = user.user_id
        elif caller.role_arn is not None:
            role = self.iam.role(caller.role_arn)
            session = caller.principal_arn.rsplit("/", 1)[-1]
            if role is not None:
                common["aws:userid"] = f"{role.role_id}:{session}"
        elif caller.principal_arn.endswith(":root"):
            common["aws:userid"] = caller.account_id
        common.update(keys)
        return RequestFacts(
            action=action,
            resource=resource,
            principal_arn=caller.principal_arn,
            principal_account=caller.account_id,
            principal_type=principal_type(caller.principal_arn),
            role_arn=caller.role_arn,
            keys=common,
        )

    def _mentions_resource_aliases(self, caller: RequestContext) -> bool:
        return self._identity(caller).uses_resource_aliases

    def _key_keys(
        self,
        caller: RequestContext,
        key: KeyRecord,
        action: str,
        *,
        context: Context | None,
        request_alias: str | None,
        extra: Mapping[str, ConditionValue] | None,
    ) -> dict[str, ConditionValue]:
        keys: dict[str, ConditionValue] = {
            "kms:KeyOrigin": key.origin.value,
            "kms:KeySpec": key.key_spec.value,
            "kms:KeyUsage": key.key_usage.value,
        }
        for tag in key.tags:
            keys[f"aws:ResourceTag/{tag.key}"] = tag.value
        if action in _CONTEXT_ACTIONS and context is not None:
            for k, v in context.items():
                keys[f"kms:EncryptionContext:{k}"] = v
            keys["kms:EncryptionContextKeys"] = tuple(context)
        alias = request_alias or audit_context.requested_alias()
        if alias is not None:
            keys["kms:RequestAlias"] = alias
        if self._aliases_of is not None and self._mentions_resource_aliases(caller):
            # A metadata read per request only for callers whose IAM policies use the key
            # (it works in IAM policies only).
            keys["kms:ResourceAliases"] = tuple(self._aliases_of(key.key_id))
        if extra:
            keys.update(extra)
        return keys

    # -- outcome ------------------------------------------------------------------------------
    def _conclude(
        self, caller: RequestContext, action: str, resource: str | None, decision: Decision
    ) -> None:
        audit_context.annotate_authorization(
            {
                "action": action,
                "resource": resource or "*",
                "decision": "Allow" if decision.allowed else "Deny",
                "decidedBy": decision.decided_by,
            }
        )
        if not decision.allowed:
            raise AccessDeniedException(decision.message(caller.principal_arn, action, resource))
