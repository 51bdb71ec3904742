"""Key policies: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies (spec §8.3).

Owns: the `default` policy name rule and storing validated documents. Evaluation of policies is
not done yet: every authenticated principal of the key's account is allowed.
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
        record = self._lookup.resolve(key_ref, allow_alias=False)
        self._ctx.authorize(caller, "kms:GetKeyPolicy", record.arn)
        if (name or DEFAULT) != DEFAULT:
            raise NotFoundException(f"Policy {name} of {record.arn} does not exist.")
        return record.policy

    def put(self, caller: RequestContext, key_ref: str, name: str | None, policy: str) -> None:
        """PutKeyPolicy. Raises MalformedPolicyDocument, LimitExceeded, NotFound, Validation."""
        if (name or DEFAULT) != DEFAULT:
            raise ValidationException("Only the policy named 'default' can be set.")
        parse_policy(policy)
        with self._ctx.meta.write():
            record = self._lookup.resolve(key_ref, allow_alias=False)
            self._ctx.authorize(caller, "kms:PutKeyPolicy", record.arn)
            self._ctx.meta.put_key(replace(record, policy=policy))

    def list(self, caller: RequestContext, key_ref: str) -> Page[str]:
        record = self._lookup.resolve(key_ref, allow_alias=False)
        self._ctx.authorize(caller, "kms:ListKeyPolicies", record.arn)
        return Page((DEFAULT,))
