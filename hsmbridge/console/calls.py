"""Running KMS operations as the signed-in principal: the console's one way into the service.

Owns: `Caller` (the principal of a session and where its browser is), `caller_context` (the
`RequestContext` an operation receives, built like the HTTP edge's: principal ARN and account,
source IP, user agent, via-service, aws:SecureTransport; edge "console") and `Operations.run`,
which validates the parameters against the KMS model and runs the operation through the
`protocol.operations` table, under the request's deadline and inside its own
`trail.context.RequestScope`, then hands one `ApiEvent` to the same hook the API's requests use
(audit line and metrics). So authorization (key policies, IAM, grants) and the audit trail are
exactly the API's. KMS errors propagate for the page to show; anything else becomes
KMSInternalException with the API's generic message (the traceback goes to the server log only).
Must not import uvicorn, pkcs11, or the service layer (handlers arrive as a table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from hsmbridge import deadline
from hsmbridge.protocol.errors import as_client_error, status_for
from hsmbridge.protocol.operations import Handler, dispatch
from hsmbridge.protocol.validation import redact_params
from hsmbridge.request import RequestContext
from hsmbridge.trail.calls import ApiEvent, api_event
from hsmbridge.trail.context import RequestScope, annotate_store, request_scope

CONSOLE_USER_AGENT: Final = "hsmbridge-console"


@dataclass(frozen=True, slots=True)
class Caller:
    """The principal of a console session and its browser."""

    access_key_id: str
    principal_arn: str
    account_id: str
    via_service: str | None
    source_ip: str | None
    user_agent: str | None
    secure: bool


def caller_context(caller: Caller) -> RequestContext:
    """A fresh request context per operation (its own request id), as the API builds one."""
    agent = f"{CONSOLE_USER_AGENT} ({caller.user_agent})" if caller.user_agent else None
    return RequestContext(
        principal_arn=caller.principal_arn,
        account_id=caller.account_id,
        source_ip=caller.source_ip,
        user_agent=agent or CONSOLE_USER_AGENT,
        edge="console",
        via_service=caller.via_service,
        secure_transport=caller.secure,
    )


class Operations:
    """The operation table of the service, run as a console caller with one audit event each."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        on_event: Callable[[ApiEvent], None] | None,
        *,
        timeout_s: float | None,
    ) -> None:
        self._handlers = handlers
        self._on_event = on_event
        self._timeout = timeout_s

    def run(self, caller: Caller, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run `operation` as `caller`; raises the KmsError the API would answer."""
        context = caller_context(caller)
        started = time.perf_counter()
        status, error_code = 200, None
        with request_scope(RequestScope(context.request_id, operation)) as scope:
            try:
                with deadline.within(self._timeout):
                    result = dispatch(self._handlers, context, operation, params)
                created_store = result.get("CustomKeyStoreId")
                if operation == "CreateCustomKeyStore" and isinstance(created_store, str):
                    annotate_store(created_store)
                return result
            except Exception as exc:
                error = as_client_error(exc, context.request_id)
                status, error_code = status_for(error), error.code
                if error is exc:
                    raise
                raise error from None
            finally:
                self._emit(
                    scope,
                    caller=caller,
                    operation=operation,
                    params=params,
                    status=status,
                    error_code=error_code,
                    started=started,
                )

    def _emit(
        self,
        scope: RequestScope,
        *,
        caller: Caller,
        operation: str,
        params: Mapping[str, Any],
        status: int,
        error_code: str | None,
        started: float,
    ) -> None:
        if self._on_event is None:
            return
        # CloudTrail's mark of a call made with console-session credentials.
        scope.additional["sessionCredentialFromConsole"] = "true"
        event = api_event(
            scope,
            operation=operation,
            principal_arn=caller.principal_arn,
            source_ip=caller.source_ip,
            status=status,
            error_code=error_code,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            params_redacted=redact_params(operation, dict(params)),
        )
        self._on_event(event)
