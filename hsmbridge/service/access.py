"""Authorization: may this caller perform this KMS action on this resource?

Owns: `AccessControl.authorize`, the one decision every service operation asks for before it acts,
whichever edge (HTTP, CLI, console) the request came through. Today's rule is the account
boundary: a principal of another account than the endpoint's is denied. Key policies, IAM
policies and grants are evaluated here when they are added, so no operation needs to change.
Must not import protocol, http or cli.
"""

from __future__ import annotations

from hsmbridge.errors import AccessDeniedException
from hsmbridge.request import RequestContext


class AccessControl:
    def __init__(self, account_id: str) -> None:
        self._account_id = account_id

    def authorize(self, caller: RequestContext, action: str, resource: str | None = None) -> None:
        """Raise AccessDeniedException unless `caller` may perform `action` (e.g. "kms:Encrypt")
        on `resource` (a key or custom key store ARN or id; None for account-level actions)."""
        if caller.is_service or caller.account_id == self._account_id:
            return
        # NOTE: differs from KMS, which serves every account; one hsmbridge endpoint holds the
        # keys of the one account in its configuration, so other accounts' principals are denied.
        target = f" on resource: {resource}" if resource else ""
        raise AccessDeniedException(
            f"User: {caller.principal_arn} is not authorized to perform: {action}{target}: "
            f"this endpoint serves account {self._account_id} only."
        )
