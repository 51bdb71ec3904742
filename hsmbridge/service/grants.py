"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

Owns: the grant rules: which operations a grant on a CloudHSM-store key may allow, constraints,
`Name` idempotency, the 50,000-grants-per-key quota, the key states that refuse new grants, who
may retire a grant, that a grantee holding CreateGrant only through a grant can pass on no more
than it holds, and grant tokens. Authorization by grants (a grantee using its grant) is
`AccessControl`'s. Grants take effect at once here, so a token is never needed to use a grant,
only accepted. Must not import protocol, http or cli.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from hsmbridge.errors import (
    AccessDeniedException,
    DisabledException,
    DryRunOperationException,
    InvalidArnException,
    InvalidGrantIdException,
    InvalidMarkerException,
    KMSInvalidStateException,
    LimitExceededException,
    NotFoundException,
    ValidationException,
)
from hsmbridge.model import Grant, GrantConstraints, KeyRecord, KeyState, Page
from hsmbridge.policy.evaluation import ConditionValue
from hsmbridge.request import RequestContext
from hsmbridge.service.access import decode_grant_token, encode_grant_token
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.lookup import KeyLookup

DRY_RUN_MESSAGE: Final = "The request would have succeeded, but the DryRun flag is set."
MAX_GRANTS_PER_KEY: Final = 50_000
MAX_CONSTRAINT_PAIRS: Final = 8
# What a grant may allow on a symmetric encryption key.
SYMMETRIC_GRANT_OPERATIONS: Final = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "CreateGrant",
        "RetireGrant",
        "DescribeKey",
    }
)
_NO_CONTEXT_OPERATIONS: Final = frozenset({"DescribeKey", "RetireGrant"})
_GRANT_ID_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_PRINCIPAL_RE: Final = re.compile(
    r"^arn:aws[a-z-]*:(?:iam::\d{12}:(?:root|user/[\w+=,.@/-]+|role/[\w+=,.@/-]+)"
    r"|sts::\d{12}:assumed-role/[\w+=,.@-]+/[\w+=,.@-]+)$"
)


@dataclass(frozen=True)
class CreateGrantRequest:
    key_ref: str
    grantee_principal: str | None
    operations: tuple[str, ...]
    retiring_principal: str | None = None
    constraints: Mapping[str, Mapping[str, str]] | None = None
    name: str | None = None
    grantee_service_principal: str | None = None
    retiring_service_principal: str | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class IssuedGrant:
    grant_id: str
    grant_token: str


def _token(grant_id: str) -> str:
    return encode_grant_token(grant_id, secrets.token_bytes(24))


def _constraints(raw: Mapping[str, Mapping[str, str]] | None) -> GrantConstraints | None:
    if not raw:
        return None
    unknown = set(raw) - {"EncryptionContextEquals", "EncryptionContextSubset"}
    if unknown:
        raise ValidationException(
            f"Constraints supports EncryptionContextEquals and EncryptionContextSubset only, "
            f"not {', '.join(sorted(unknown))}."
        )
    if len(raw) > 1:
        raise ValidationException(
            "Specify EncryptionContextEquals or EncryptionContextSubset, not both."
        )
    ((kind, pairs),) = raw.items()
    if len(pairs) > MAX_CONSTRAINT_PAIRS:
        raise ValidationException(
            f"A grant constraint can have at most {MAX_CONSTRAINT_PAIRS} encryption context pairs."
        )
    for value in pairs.values():
        if len(value) > 384:
            raise ValidationException("Grant constraint values can be at most 384 characters.")
    items = tuple(sorted((str(k), str(v)) for k, v in pairs.items()))
    if kind == "EncryptionContextEquals":
        return GrantConstraints(equals=items)
    return GrantConstraints(subset=items)


def _at_least_as_strict(child: GrantConstraints | None, parent: GrantConstraints | None) -> bool:
    """Spec §8.5: a grant's grantee passes on CreateGrant only with the same or stricter
    constraints. Stricter: Equals with every parent pair, or Subset with every parent pair."""
    if parent is None:
        return True
    if child is None:
        return False
    parent_pairs = {(k.lower(), v) for k, v in (parent.equals or parent.subset or ())}
    child_pairs = {(k.lower(), v) for k, v in (child.equals or child.subset or ())}
    if parent.equals is not None:
        return child.equals is not None and child_pairs == parent_pairs
    return parent_pairs <= child_pairs


def _check_principal(value: str, member: str) -> None:
    if not _PRINCIPAL_RE.match(value):
        raise ValidationException(
            f"{member} {value!r} is not a valid principal: use the ARN of an AWS account "
            "(arn:aws:iam::ACCOUNT:root), IAM user, IAM role or assumed-role session."
        )


def _page_marker(marker: str | None) -> str | None:
    if marker is not None and not _GRANT_ID_RE.match(marker):
        raise InvalidMarkerException("The Marker is not one that this list operation returned.")
    return marker


class GrantService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup) -> None:
        self._ctx = ctx
        self._lookup = lookup

    # -- CreateGrant --------------------------------------------------------------------------
    def create(self, caller: RequestContext, req: CreateGrantRequest) -> IssuedGrant:
        """CreateGrant. https://docs.aws.amazon.com/kms/latest/APIReference/API_CreateGrant.html

        Raises Validation, NotFound, Disabled, KMSInvalidState, LimitExceeded, AccessDenied,
        InvalidGrantToken, DryRunOperation.
        """
        operations, constraints = self._validated(req)
        grantee = req.grantee_principal or ""  # _validated refused a missing one
        record = self._lookup.resolve(caller, req.key_ref, allow_alias=False)
        decision = self._ctx.authorize_key(
            caller,
            "kms:CreateGrant",
            record,
            keys=self._conditions(caller, req, operations, constraints),
        )
        if decision.decided_by.startswith("grant "):
            self._check_delegation(caller, record, operations, constraints)
        state = self._lookup.state(record)
        if state is KeyState.DISABLED:
            raise DisabledException(f"{record.arn} is disabled.")
        if state is KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{record.arn} is pending deletion.")
        if req.dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        with self._ctx.meta.write():
            if req.name:
                for existing in self._ctx.meta.grants_named(record.key_id, req.name):
                    if self._same(existing, req, operations, constraints):
                        return IssuedGrant(existing.grant_id, _token(existing.grant_id))
            if self._ctx.meta.count_grants(record.key_id) >= MAX_GRANTS_PER_KEY:
                raise LimitExceededException(
                    f"{record.arn} already has {MAX_GRANTS_PER_KEY} grants, the quota per key."
                )
            grant = Grant(
                grant_id=secrets.token_hex(32),
                key_id=record.key_id,
                key_arn=record.arn,
                name=req.name or "",
                grantee_principal=grantee,
                retiring_principal=req.retiring_principal,
                issuing_account=f"arn:{self._ctx.settings.partition}:iam::{record.account_id}:root",
                operations=operations,
                constraints=constraints,
                creation_date=self._ctx.clock(),
            )
            self._ctx.meta.put_grant(grant)
        return IssuedGrant(grant.grant_id, _token(grant.grant_id))

    def _validated(
        self, req: CreateGrantRequest
    ) -> tuple[tuple[str, ...], GrantConstraints | None]:
        """CreateGrant's input rules; returns the operations (deduplicated) and constraints."""
        if req.grantee_service_principal or req.retiring_service_principal:
            raise ValidationException(
                "GranteeServicePrincipal and RetiringServicePrincipal need a SourceArn "
                "constraint, which applies to AWS services only; name an IAM principal."
            )
        if not req.grantee_principal:
            raise ValidationException("GranteePrincipal is required.")
        _check_principal(req.grantee_principal, "GranteePrincipal")
        if req.retiring_principal is not None:
            _check_principal(req.retiring_principal, "RetiringPrincipal")
        operations = tuple(dict.fromkeys(req.operations))
        if not operations:
            raise ValidationException("Operations must name at least one operation.")
        not_allowed = [op for op in operations if op not in SYMMETRIC_GRANT_OPERATIONS]
        if not_allowed:
            raise ValidationException(
                f"Grant operations {', '.join(not_allowed)} are not valid for a symmetric "
                "encryption KMS key in a custom key store."
            )
        constraints = _constraints(req.constraints)
        if constraints is not None and set(operations) & _NO_CONTEXT_OPERATIONS:
            raise ValidationException(
                "Encryption context constraints cannot be used in a grant for DescribeKey or "
                "RetireGrant; create a separate grant for them."
            )
        for principal in (req.grantee_principal, req.retiring_principal):
            if principal is not None and not self._ctx.access.iam.principal_exists(principal):
                raise ValidationException(f"{principal} is not a valid principal in IAM.")
        return operations, constraints

    def _conditions(
        self,
        caller: RequestContext,
        req: CreateGrantRequest,
        operations: tuple[str, ...],
        constraints: GrantConstraints | None,
    ) -> dict[str, ConditionValue]:
        keys: dict[str, ConditionValue] = {
            "kms:GrantOperations": operations,
            "kms:GranteePrincipal": req.grantee_principal or "",
            "kms:GrantIsForAWSResource": caller.via_aws_service,
        }
        if req.retiring_principal is not None:
            keys["kms:RetiringPrincipal"] = req.retiring_principal
        if constraints is not None and constraints.constraint_type is not None:
            keys["kms:GrantConstraintType"] = constraints.constraint_type
            pairs = constraints.equals or constraints.subset or ()
            for k, v in pairs:
                keys[f"kms:EncryptionContext:{k}"] = v
            keys["kms:EncryptionContextKeys"] = tuple(k for k, _ in pairs)
        return keys

    def _check_delegation(
        self,
        caller: RequestContext,
        record: KeyRecord,
        operations: Sequence[str],
        constraints: GrantConstraints | None,
    ) -> None:
        """The caller may create grants only through a grant: pass on no more than it holds."""
        grantees = tuple(a for a in (caller.principal_arn, caller.role_arn) if a)
        for parent in self._ctx.meta.grants_for(record.key_id, grantees):
            if (
                "CreateGrant" in parent.operations
                and set(operations) <= set(parent.operations)
                and _at_least_as_strict(constraints, parent.constraints)
            ):
                return
        raise AccessDeniedException(
            f"User: {caller.principal_arn} is not authorized to perform: kms:CreateGrant on "
            f"resource: {record.arn} because a grant can pass on only the operations and "
            "constraints of the grant that allows CreateGrant"
        )

    @staticmethod
    def _same(
        existing: Grant,
        req: CreateGrantRequest,
        operations: tuple[str, ...],
        constraints: GrantConstraints | None,
    ) -> bool:
        return (
            existing.grantee_principal == req.grantee_principal
            and existing.retiring_principal == req.retiring_principal
            and set(existing.operations) == set(operations)
            and existing.constraints == constraints
        )

    # -- ListGrants / ListRetirableGrants ----------------------------------------------------
    def list(
        self,
        caller: RequestContext,
        key_ref: str,
        limit: int | None,
        marker: str | None,
        *,
        grant_id: str | None = None,
        grantee: str | None = None,
    ) -> Page[Grant]:
        """ListGrants (Limit 1-100, default 50), optionally one grant or one grantee's."""
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(
            caller,
            "kms:ListGrants",
            record,
            keys={"kms:GrantIsForAWSResource": caller.via_aws_service},
        )
        if grant_id is not None:
            grant = self._ctx.meta.get_grant(grant_id)
            found = grant is not None and grant.key_id == record.key_id
            if found and grantee is not None and grant is not None:
                found = grant.grantee_principal == grantee
            return Page((grant,) if found and grant is not None else ())
        size = limit or 50
        rows = self._ctx.meta.list_grants(
            record.key_id, size + 1, _page_marker(marker), grantee=grantee
        )
        items = tuple(rows[:size])
        return Page(items, items[-1].grant_id if len(rows) > size else None)

    def list_retirable(
        self, caller: RequestContext, retiring_principal: str, limit: int | None, marker: str | None
    ) -> Page[Grant]:
        """ListRetirableGrants: authorized by IAM policies alone."""
        self._ctx.authorize(caller, "kms:ListRetirableGrants")
        if not _PRINCIPAL_RE.match(retiring_principal):
            raise InvalidArnException(f"{retiring_principal!r} is not a valid principal ARN.")
        size = limit or 50
        rows = self._ctx.meta.retirable_grants(retiring_principal, size + 1, _page_marker(marker))
        if self._ctx.is_foreign(caller):
            rows = [g for g in rows if g.key_arn.split(":")[4] == caller.account_id]
        items = tuple(rows[:size])
        return Page(items, items[-1].grant_id if len(rows) > size else None)

    # -- RetireGrant / RevokeGrant ------------------------------------------------------------
    def retire(
        self,
        caller: RequestContext,
        *,
        grant_token: str | None,
        key_ref: str | None,
        grant_id: str | None,
        dry_run: bool = False,
    ) -> None:
        """RetireGrant by token, or by KeyId and GrantId. Allowed for the retiring principal,
        the grantee when the grant allows RetireGrant, and principals whose policies allow
        kms:RetireGrant on the key."""
        if grant_token is not None:
            token_grant_id = decode_grant_token(grant_token)
            if grant_id is not None and grant_id != token_grant_id:
                raise ValidationException("GrantId does not match the grant the GrantToken names.")
            grant_id = token_grant_id
        elif key_ref is None or grant_id is None:
            raise ValidationException("Specify GrantToken, or both KeyId and GrantId.")
        assert grant_id is not None
        grant = self._grant(grant_id)
        if key_ref is not None:
            record = self._lookup.resolve(caller, key_ref, allow_alias=False)
            if record.key_id != grant.key_id:
                raise NotFoundException(f"Grant ID {grant_id} is not a grant of {record.arn}.")
        identities = {caller.principal_arn, caller.role_arn}
        may_retire = grant.retiring_principal in identities or (
            grant.grantee_principal in identities and "RetireGrant" in grant.operations
        )
        if not may_retire:
            key = self._ctx.meta.get_key(grant.key_id)
            if key is None:
                raise NotFoundException(f"Grant ID {grant_id} not found.")
            self._ctx.authorize_key(caller, "kms:RetireGrant", key)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        self._ctx.meta.delete_grant(grant_id)

    def revoke(
        self, caller: RequestContext, key_ref: str, grant_id: str, *, dry_run: bool = False
    ) -> None:
        """RevokeGrant: needs kms:RevokeGrant on the key."""
        record = self._lookup.resolve(caller, key_ref, allow_alias=False)
        self._ctx.authorize_key(
            caller,
            "kms:RevokeGrant",
            record,
            keys={"kms:GrantIsForAWSResource": caller.via_aws_service},
        )
        grant = self._grant(grant_id)
        if grant.key_id != record.key_id:
            raise NotFoundException(f"Grant ID {grant_id} is not a grant of {record.arn}.")
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        self._ctx.meta.delete_grant(grant_id)

    def _grant(self, grant_id: str) -> Grant:
        if not _GRANT_ID_RE.match(grant_id):
            raise InvalidGrantIdException(f"{grant_id!r} is not a grant ID KMS issued.")
        grant = self._ctx.meta.get_grant(grant_id)
        if grant is None:
            raise NotFoundException(f"Grant ID {grant_id} not found.")
        return grant
