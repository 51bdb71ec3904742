"""Request-scoped audit annotations: facts the service learns that the one per-request event needs.

Owns: `RequestScope` (request id, operation, key ARN, custom key store id, accumulated HSM latency
and extra event data), a contextvar holding the current one, and the helpers the service and the
backend timing wrapper call (`annotate_key`, `annotate_store`, `add_hsm_latency`, `attach`,
`annotate_authorization`, `note_request_alias`).
The HTTP edge opens a scope per request and reads it back when it builds the audit event, so the
service never imports the API and the API never asks the service what it did.
Outside a request (CLI, background sweeper) every helper is a no-op and `attach` returns False.
Must not import metadata, backend or anything above.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestScope:
    """Mutable on purpose: the handler's worker thread writes, the event loop reads afterwards.

    Writes happen before the handler returns and the read after its future resolves, so the
    future's own synchronisation orders them; no lock is needed.
    """

    request_id: str
    operation: str | None = None
    key_arn: str | None = None
    custom_key_store_id: str | None = None
    hsm_latency_ms: float = 0.0
    hsm_calls: int = 0
    other_key_arns: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)
    # The alias the last resolved KeyId named (None: a key id or ARN): kms:RequestAlias.
    request_alias: str | None = None


_current: ContextVar[RequestScope | None] = ContextVar("hsmbridge_request_scope", default=None)


def current() -> RequestScope | None:
    return _current.get()


def current_request_id() -> str | None:
    scope = _current.get()
    return scope.request_id if scope is not None else None


@contextmanager
def request_scope(scope: RequestScope) -> Iterator[RequestScope]:
    """Make `scope` current for this context (a task, or a worker thread via copy_context)."""
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def annotate_key(key_arn: str, custom_key_store_id: str | None = None) -> None:
    """Record a key the request acted on; a second distinct key (ReEncrypt) goes to the extras."""
    scope = _current.get()
    if scope is None:
        return
    if scope.key_arn is None:
        scope.key_arn = key_arn
    elif key_arn != scope.key_arn and key_arn not in scope.other_key_arns:
        scope.other_key_arns.append(key_arn)
    if custom_key_store_id is not None and scope.custom_key_store_id is None:
        scope.custom_key_store_id = custom_key_store_id


def annotate_store(custom_key_store_id: str) -> None:
    scope = _current.get()
    if scope is not None and scope.custom_key_store_id is None:
        scope.custom_key_store_id = custom_key_store_id


def note_request_alias(alias_name: str | None) -> None:
    """Record which alias (if any) the KeyId just resolved named, for kms:RequestAlias."""
    scope = _current.get()
    if scope is not None:
        scope.request_alias = alias_name


def requested_alias() -> str | None:
    scope = _current.get()
    return scope.request_alias if scope is not None else None


def annotate_authorization(entry: Mapping[str, Any]) -> None:
    """Record one authorization decision (action, resource, Allow/Deny, the deciding policy)."""
    scope = _current.get()
    if scope is not None:
        scope.additional.setdefault("authorization", []).append(dict(entry))


def add_hsm_latency(latency_ms: float) -> None:
    """Called by the backend timing wrapper once per HSM call made for this request."""
    scope = _current.get()
    if scope is not None:
        scope.hsm_latency_ms += latency_ms
        scope.hsm_calls += 1


def attach(
    event_name: str,
    *,
    key_arn: str | None,
    custom_key_store_id: str | None,
    additional: Mapping[str, Any],
) -> bool:
    """Fold a service-side event into the current request's event if it describes the same call.

    Returns False (the caller emits the event itself) outside a request or when the event is a
    different action, e.g. a DeleteKey service event finished during a ConnectCustomKeyStore.
    """
    scope = _current.get()
    if scope is None or scope.operation != event_name:
        return False
    if key_arn is not None:
        annotate_key(key_arn, custom_key_store_id)
    elif custom_key_store_id is not None:
        annotate_store(custom_key_store_id)
    scope.additional.update(additional)
    return True
