"""One audit-trail event per KMS call, whichever edge served it (HTTP, CLI, console).

Owns: `ApiEvent` (what an edge knows once a call has ended: who, what, outcome, and what the
service annotated in the request scope) and `audit_event()`, its one translation into the
`AuditEvent` written to the trail. Edges build the `ApiEvent` with `api_event()`, so an API call
and the same action through the CLI produce the same line.
Must not import metadata, backend or anything above.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmbridge.trail.context import RequestScope
from hsmbridge.trail.events import AuditEvent, redact


@dataclass(frozen=True, slots=True)
class ApiEvent:
    """One per request, for the audit trail. Secrets are already redacted from params."""

    request_id: str
    operation: str | None
    principal_arn: str | None
    source_ip: str | None
    status: int
    error_code: str | None
    duration_ms: float
    params_redacted: Mapping[str, Any]
    key_arn: str | None = None
    custom_key_store_id: str | None = None
    hsm_latency_ms: float | None = None  # None: the request made no HSM call
    additional: Mapping[str, Any] | None = None  # service facts (e.g. CreateKey's backingKeyId)
    # How the HTTP edge ran the handler ("inline", "rerun", "thread"), for its metrics; not in
    # the trail.
    ran: str | None = None


def api_event(
    scope: RequestScope,
    *,
    operation: str | None,
    principal_arn: str | None,
    source_ip: str | None,
    status: int,
    error_code: str | None,
    duration_ms: float,
    params_redacted: Mapping[str, Any],
    ran: str | None = None,
) -> ApiEvent:
    """The event of a finished call, with what the service annotated in its request scope."""
    additional = dict(scope.additional)
    if scope.other_key_arns:
        additional["otherKeyArns"] = list(scope.other_key_arns)
    return ApiEvent(
        request_id=scope.request_id,
        operation=operation,
        principal_arn=principal_arn,
        source_ip=source_ip,
        status=status,
        error_code=error_code,
        duration_ms=duration_ms,
        params_redacted=params_redacted,
        key_arn=scope.key_arn,
        custom_key_store_id=scope.custom_key_store_id,
        hsm_latency_ms=scope.hsm_latency_ms if scope.hsm_calls else None,
        additional=additional,
        ran=ran,
    )


def audit_event(event: ApiEvent) -> AuditEvent:
    """The trail's record of one call."""
    additional: dict[str, Any] = {"status": event.status, "durationMs": round(event.duration_ms, 3)}
    additional.update(event.additional or {})
    return AuditEvent(
        event_name=event.operation or "Unknown",
        event_time=time.time(),
        request_id=event.request_id,
        principal_arn=event.principal_arn,
        source_ip=event.source_ip,
        # Second, model-independent pass: the edge already hid the model's sensitive members;
        # this also hides the names hsmbridge treats as secret everywhere.
        request_parameters=redact(event.params_redacted),
        key_arn=event.key_arn,
        custom_key_store_id=event.custom_key_store_id,
        error_code=event.error_code,
        hsm_latency_ms=event.hsm_latency_ms,
        additional=additional,
    )
