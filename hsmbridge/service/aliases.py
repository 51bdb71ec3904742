"""Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases.

Owns: alias name rules (prefix `alias/`, 1-256 characters, `alias/aws/` reserved, 50 per key),
which key states allow aliasing, and alias listing. Must not import protocol, http or cli.
"""

from __future__ import annotations

from hsmbridge import ids
from hsmbridge.errors import (
    AlreadyExistsException,
    InvalidAliasNameException,
    InvalidMarkerException,
    LimitExceededException,
    NotFoundException,
)
from hsmbridge.model import Alias, Page
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.lookup import KeyLookup, require_not_pending

MAX_ALIASES_PER_KEY = 50


def check_alias_name(name: str) -> None:
    if not 1 <= len(name) <= 256 or not ids.ALIAS_NAME_RE.match(name):
        raise InvalidAliasNameException(
            f"Alias name {name!r} must begin with 'alias/' and contain only letters, digits, "
            "'/', '_', '-' and ':' (256 characters at most)."
        )
    # KMS reserves the prefix in any letter case: `alias/AWS/x` is refused as `alias/aws/x` is.
    if name.lower().startswith(ids.RESERVED_ALIAS_PREFIX):
        raise InvalidAliasNameException(
            f"{name}: the alias/aws/ prefix is reserved for AWS managed keys."
        )


class AliasService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup) -> None:
        self._ctx = ctx
        self._lookup = lookup

    def _arn(self, name: str) -> str:
        s = self._ctx.settings
        return ids.alias_arn(s.partition, s.region, s.account_id, name)

    def create(self, caller: RequestContext, name: str, target: str) -> None:
        """CreateAlias. Raises AlreadyExists, NotFound, InvalidAliasName, KMSInvalidState,
        LimitExceeded."""
        check_alias_name(name)
        # Two permissions: on the alias (IAM) and on the key (key policy).
        self._ctx.authorize(caller, "kms:CreateAlias", self._arn(name))
        self._ctx.require_home_account(caller, "kms:CreateAlias")
        with self._ctx.meta.write():
            record = self._lookup.resolve(caller, target, allow_alias=False)
            self._ctx.authorize_key(caller, "kms:CreateAlias", record)
            require_not_pending(record)
            if self._ctx.meta.get_alias(name) is not None:
                raise AlreadyExistsException(
                    f"An alias with the name {self._arn(name)} already exists"
                )
            if self._ctx.meta.count_aliases(record.key_id) >= MAX_ALIASES_PER_KEY:
                raise LimitExceededException(
                    f"{record.arn} already has {MAX_ALIASES_PER_KEY} aliases, the quota per key."
                )
            now = self._ctx.clock()
            self._ctx.meta.put_alias(Alias(name, self._arn(name), record.key_id, now, now))

    def update(self, caller: RequestContext, name: str, target: str) -> None:
        """UpdateAlias: the new target must not be pending deletion. Raises NotFound,
        KMSInvalidState, LimitExceeded.

        The name is not checked with `check_alias_name`: KMS lists no InvalidAliasNameException
        for UpdateAlias or DeleteAlias, and a name CreateAlias refuses can never exist, so it is
        simply not found.
        """
        self._ctx.authorize(caller, "kms:UpdateAlias", self._arn(name))
        self._ctx.require_home_account(caller, "kms:UpdateAlias")
        with self._ctx.meta.write():
            alias = self._ctx.meta.get_alias(name)
            if alias is None:
                raise NotFoundException(f"Alias {self._arn(name)} is not found.")
            # On the alias, the key it names now and the key it will name.
            old = self._ctx.meta.get_key(alias.target_key_id)
            if old is not None:
                self._ctx.authorize_key(caller, "kms:UpdateAlias", old)
            record = self._lookup.resolve(caller, target, allow_alias=False)
            self._ctx.authorize_key(caller, "kms:UpdateAlias", record)
            require_not_pending(record)
            if self._ctx.meta.count_aliases(record.key_id) >= MAX_ALIASES_PER_KEY:
                raise LimitExceededException(
                    f"{record.arn} already has {MAX_ALIASES_PER_KEY} aliases, the quota per key."
                )
            self._ctx.meta.put_alias(
                Alias(name, alias.arn, record.key_id, alias.creation_date, self._ctx.clock())
            )

    def delete(self, caller: RequestContext, name: str) -> None:
        """DeleteAlias. Raises NotFound (also for names CreateAlias would refuse; see update)."""
        self._ctx.authorize(caller, "kms:DeleteAlias", self._arn(name))
        self._ctx.require_home_account(caller, "kms:DeleteAlias")
        with self._ctx.meta.write():
            alias = self._ctx.meta.get_alias(name)
            if alias is None:
                raise NotFoundException(f"Alias {self._arn(name)} is not found.")
            key = self._ctx.meta.get_key(alias.target_key_id)
            if key is not None:
                self._ctx.authorize_key(caller, "kms:DeleteAlias", key)
            self._ctx.meta.delete_alias(name)

    def list(
        self, caller: RequestContext, key_ref: str | None, limit: int | None, marker: str | None
    ) -> Page[Alias]:
        """ListAliases (Limit 1-100, default 50), optionally for one key."""
        self._ctx.authorize(caller, "kms:ListAliases")
        if self._ctx.is_foreign(caller):
            return Page(())  # ListAliases shows the caller's own account, which holds none here
        key_id = None
        if key_ref is not None:
            key_id = self._lookup.resolve(caller, key_ref, allow_alias=False).key_id
        if marker is not None and not marker.startswith("alias/"):
            raise InvalidMarkerException("The Marker is not one that ListAliases returned.")
        size = limit or 50
        rows = self._ctx.meta.list_aliases(key_id, size + 1, marker)
        items = tuple(rows[:size])
        return Page(items, items[-1].name if len(rows) > size else None)
