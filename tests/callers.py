"""The callers tests act as: the request context every service operation takes first.

`ADMIN` is a principal of `ACCOUNT`, the account every test environment's endpoint serves
(tests/harness.py writes it into hsmbridge.toml and the credentials file), so it may do anything;
`OUTSIDER` belongs to another account and is denied everything; `SERVICE` is hsmbridge acting on
its own behalf (recovery, the deletion sweeper). The service reads no request id from a caller,
so one constant context serves a whole test; `admin()` makes a fresh one when a test wants it.
"""

from __future__ import annotations

from typing import Final

from hsmbridge.request import RequestContext
from tests.harness import ACCOUNT

OTHER_ACCOUNT: Final = "444455556666"
ADMIN_ARN: Final = f"arn:aws:iam::{ACCOUNT}:user/tester"  # the harness's credentials principal
OUTSIDER_ARN: Final = f"arn:aws:iam::{OTHER_ACCOUNT}:user/mallory"


def admin(account_id: str = ACCOUNT) -> RequestContext:
    """An IAM user of `account_id` (by default the endpoint's own account)."""
    return RequestContext(f"arn:aws:iam::{account_id}:user/tester", account_id)


ADMIN: Final = admin()
OUTSIDER: Final = RequestContext(OUTSIDER_ARN, OTHER_ACCOUNT)
SERVICE: Final = RequestContext.service_principal(ACCOUNT)
