"""Key policies: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies.

Owns: the `default` policy name rule and storing validated documents; the checks on a new
document (existing principals, lockout safety) are access control's, evaluation too.
Must not import protocol, http or cli.
"""

from __future__ import annotations

from dataclasses import replace

from hsmbridge.errors import NotFoundException, ValidationException
from hsmbridge.model import Page
from hsmbridge.policy.document import parse_policy
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.lookup import KeyLookup

DEFAULT = "default"


class PolicyService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup) -> None:
        self._ctx = ctx
        self._lookup = lookup

    def get(self, caller: RequestContext, key_ref: str, name: str | None) -> str:
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(caller, "kms:GetKeyPolicy", record)
        if (name or DEFAULT) != DEFAULT:
            raise NotFoundException(f"Policy {name} of {record.arn} does not exist.")
        return record.policy

    def put(
        self,
        caller: RequestContext,
        key_ref: str,
        name: str | None,
        policy: str,
        *,
        bypass_lockout_check: bool = False,
    ) -> None:
        """PutKeyPolicy. Raises MalformedPolicyDocument (also for principals that do not exist
        and, unless bypassed, a policy that would lock the caller out), LimitExceeded, NotFound,
        Validation."""
        if (name or DEFAULT) != DEFAULT:
            raise ValidationException("Only the policy named 'default' can be set.")
        parse_policy(policy)
        with self._ctx.meta.write():
            record = self._lookup.resolve(caller, key_ref, allow_alias=False)
            self._ctx.authorize_key(
                caller,
                "kms:PutKeyPolicy",
                record,
                keys={
                    "kms:BypassPolicyLockoutSafetyCheck": bypass_lockout_check,
                    "kms:PolicyName": name or DEFAULT,
                },
            )
            self._ctx.access.check_new_key_policy(
                caller, record, policy, bypass_lockout_check=bypass_lockout_check
            )
            self._ctx.meta.put_key(replace(record, policy=policy))

    def list(self, caller: RequestContext, key_ref: str) -> Page[str]:
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(caller, "kms:ListKeyPolicies", record)
        return Page((DEFAULT,))
