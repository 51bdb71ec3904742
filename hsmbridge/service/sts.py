"""STS semantics: AssumeRole, GetSessionToken and GetCallerIdentity over the IAM directory.

Owns: `StsService`, one method per STS operation, each taking the authenticated `Caller` (from
`identity.sessions`: long-term key or session) and the request's `RequestContext`. AssumeRole is
authorized as AWS does: the role's trust policy is the resource policy of `sts:AssumeRole`, so a
trust naming the caller's ARN in the role's account suffices alone, while a trust naming the
account (or a caller of another account) also needs the caller's identity policies to allow
`sts:AssumeRole` on the role (`policy.decision.decide_resource_access` with
`cross_account_actions={"sts:AssumeRole"}`). The session policy of the caller's own session, if
any, limits it too. Credentials come from `identity.sessions.SessionIssuer`.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from hsmbridge.errors import (
    AccessDeniedException,
    MalformedPolicyDocumentStsException,
    ValidationException,
)
from hsmbridge.identity.credentials import caller_principal_type as principal_type
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.identity.sessions import Caller, SessionIssuer, TemporaryCredentials
from hsmbridge.policy.decision import decide_resource_access
from hsmbridge.policy.document import PolicyDocument, PolicyDocumentError, parse_identity_policy
from hsmbridge.policy.evaluation import ConditionValue, RequestFacts
from hsmbridge.request import RequestContext
from hsmbridge.service.context import Clock

ASSUME_ROLE: Final = "sts:AssumeRole"
DEFAULT_ROLE_DURATION_S: Final = 3600
ROLE_CHAINING_MAX_S: Final = 3600
DEFAULT_SESSION_TOKEN_DURATION_S: Final = 43_200
ROOT_SESSION_MAX_S: Final = 3600
MAX_PACKED_POLICY_CHARS: Final = 2048
_TRUST_ACTIONS: Final = frozenset({ASSUME_ROLE})


@dataclass(frozen=True, slots=True)
class AssumedRole:
    credentials: TemporaryCredentials
    assumed_role_id: str  # ROLEID:SESSION
    arn: str  # arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION
    packed_policy_size: int | None  # percent of the allowed size; None without a Policy
    source_identity: str | None


@dataclass(frozen=True, slots=True)
class CallerIdentity:
    user_id: str
    account: str
    arn: str


def _partition(arn: str) -> str:
    parts = arn.split(":", 2)
    return parts[1] if len(parts) > 2 and parts[1] else "aws"


class StsService:
    def __init__(self, iam: IamDirectory, issuer: SessionIssuer, clock: Clock) -> None:
        self.iam = iam
        self._issuer = issuer
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(int(self._clock()), UTC)

    # -- GetCallerIdentity --------------------------------------------------------------------
    def get_caller_identity(self, caller: Caller) -> CallerIdentity:
        """Any authenticated caller may ask who it is (no policy can deny it, as in AWS)."""
        if caller.session is not None:
            user_id = caller.session.user_id_for_caller
        elif caller.arn.endswith(":root"):
            user_id = caller.account_id
        else:
            user_id = self._long_term_id(caller)
        return CallerIdentity(user_id, caller.account_id, caller.arn)

    def _long_term_id(self, caller: Caller) -> str:
        user = self.iam.user(caller.arn)
        if user is not None:
            return user.user_id
        role = self.iam.role(caller.arn)  # a credentials-file key that acts as a role
        if role is not None:
            return role.role_id
        return caller.access_key_id

    # -- GetSessionToken ----------------------------------------------------------------------
    def get_session_token(self, caller: Caller, duration_s: int | None) -> TemporaryCredentials:
        """Session credentials with the caller's own identity (users and account roots only)."""
        if caller.is_temporary:
            raise AccessDeniedException("Cannot call GetSessionToken with session credentials")
        kind = principal_type(caller.arn)
        if kind not in {"User", "Account"}:
            raise AccessDeniedException(
                f"User: {caller.arn} is not authorized to perform: sts:GetSessionToken"
            )
        duration = DEFAULT_SESSION_TOKEN_DURATION_S if duration_s is None else duration_s
        user_id = caller.account_id
        if kind == "Account":
            duration = min(duration, ROOT_SESSION_MAX_S)  # AWS shortens root sessions silently
        else:
            user_id = self._long_term_id(caller)
        return self._issuer.issue(
            principal_arn=caller.arn,
            account_id=caller.account_id,
            expiration=self._now() + timedelta(seconds=duration),
            user_id=user_id,
        )

    # -- AssumeRole ---------------------------------------------------------------------------
    def assume_role(
        self,
        caller: Caller,
        context: RequestContext,
        *,
        role_arn: str,
        session_name: str,
        duration_s: int | None = None,
        policy: str | None = None,
        source_identity: str | None = None,
    ) -> AssumedRole:
        """Credentials for a session of `role_arn`, if its trust policy and the caller's IAM
        policies allow the caller to assume it."""
        denied = AccessDeniedException(
            f"User: {caller.arn} is not authorized to perform: {ASSUME_ROLE} on resource: "
            f"{role_arn}"
        )
        role = self.iam.role(role_arn)
        if role is None:
            raise denied
        packed = self._session_policy(policy)
        facts = self._facts(caller, context, role_arn, session_name, source_identity)
        decision = decide_resource_access(
            facts,
            resource_account=role.account_id,
            resource_policy=role.trust_policy,
            resource_label=f"trust policy of {role.arn}",
            identity_policies=[
                (p.label, p.document)
                for p in self.iam.identity_policies(caller.arn, role_arn=caller.role_arn)
            ],
            session_policy=self._callers_session_policy(caller),
            cross_account_actions=_TRUST_ACTIONS,
        )
        if not decision.allowed:
            raise AccessDeniedException(decision.message(caller.arn, ASSUME_ROLE, role_arn))
        duration = self._role_duration(caller, duration_s, role.max_session_duration)
        if caller.session is not None and caller.session.source_identity is not None:
            source_identity = caller.session.source_identity  # a chained session keeps it
        partition = _partition(role.arn)
        arn = f"arn:{partition}:sts::{role.account_id}:assumed-role/{role.name}/{session_name}"
        credentials = self._issuer.issue(
            principal_arn=arn,
            account_id=role.account_id,
            expiration=self._now() + timedelta(seconds=duration),
            role_arn=role.arn,
            role_id=role.role_id,
            session_name=session_name,
            session_policy=packed,
            source_identity=source_identity,
        )
        size = None
        if packed is not None:
            size = math.ceil(len(packed) * 100 / MAX_PACKED_POLICY_CHARS)
        return AssumedRole(
            credentials, f"{role.role_id}:{session_name}", arn, size, source_identity
        )

    @staticmethod
    def _role_duration(caller: Caller, duration_s: int | None, role_max: int) -> int:
        if duration_s is None:
            return min(DEFAULT_ROLE_DURATION_S, role_max)
        chained = caller.session is not None and caller.session.role_arn is not None
        if chained and duration_s > ROLE_CHAINING_MAX_S:
            raise ValidationException(
                "The requested DurationSeconds exceeds the 1 hour session limit for roles "
                "assumed by role chaining."
            )
        if duration_s > role_max:
            raise ValidationException(
                "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
            )
        return duration_s

    @staticmethod
    def _session_policy(policy: str | None) -> str | None:
        """The Policy parameter, checked and packed (compact JSON) for the session token."""
        if policy is None:
            return None
        try:
            doc = json.loads(policy)
            parse_identity_policy(doc)
        except RecursionError:
            raise MalformedPolicyDocumentStsException(
                "The policy is nested too deeply to be a policy document."
            ) from None
        except (ValueError, PolicyDocumentError) as exc:  # JSONDecodeError is a ValueError
            detail = (
                str(exc)
                if isinstance(exc, PolicyDocumentError)
                else "The policy is not in the valid JSON format."
            )
            raise MalformedPolicyDocumentStsException(detail) from None
        packed = json.dumps(doc, separators=(",", ":"))
        if len(packed) > MAX_PACKED_POLICY_CHARS:
            raise ValidationException(
                "1 validation error detected: Value at 'policy' failed to satisfy constraint: "
                f"Member must have length less than or equal to {MAX_PACKED_POLICY_CHARS}"
            )
        return packed

    @staticmethod
    def _callers_session_policy(caller: Caller) -> PolicyDocument | None:
        text = caller.session_policy
        if text is None:
            return None
        try:
            return parse_identity_policy(json.loads(text))
        except (ValueError, RecursionError, PolicyDocumentError):  # checked at issue
            return None

    def _facts(
        self,
        caller: Caller,
        context: RequestContext,
        role_arn: str,
        session_name: str,
        source_identity: str | None,
    ) -> RequestFacts:
        now = self._clock()
        keys: dict[str, ConditionValue] = {
            "aws:CurrentTime": datetime.fromtimestamp(now, UTC),
            "aws:EpochTime": int(now),
            "aws:SecureTransport": context.secure_transport,
            "sts:RoleSessionName": session_name,
        }
        if context.source_ip:
            keys["aws:SourceIp"] = context.source_ip
        if context.user_agent:
            keys["aws:UserAgent"] = context.user_agent
        if source_identity:
            keys["sts:SourceIdentity"] = source_identity
        return RequestFacts(
            action=ASSUME_ROLE,
            resource=role_arn,
            principal_arn=caller.arn,
            principal_account=caller.account_id,
            principal_type=principal_type(caller.arn),
            role_arn=caller.role_arn,
            keys=keys,
        )
