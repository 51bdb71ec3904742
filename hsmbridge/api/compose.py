"""Composition root of the HTTP service: settings → KmsService → KMS ASGI app.

Owns: `create_app()`, the one place that wires the PKCS#11 connector, the service, SigV4, the
audit sink and the health endpoint together for `hsmbridge serve`, the tests and the benchmark.
Must not import pkcs11 directly (the backend package does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hsmbridge.api.app import ApiEvent, KmsApi, create_asgi_app
from hsmbridge.api.auth import SigV4Verifier
from hsmbridge.api.operations import build_operations
from hsmbridge.audit.events import AuditEvent, AuditSink, JsonLinesSink
from hsmbridge.backend import HsmConnector
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.config import Settings
from hsmbridge.model import ConnectionState
from hsmbridge.service.context import Clock
from hsmbridge.service.kms import KmsService, open_service


@dataclass
class Runtime:
    service: KmsService
    app: KmsApi
    audit: AuditSink

    def close(self) -> None:
        self.app.close()
        self.service.close()
        if isinstance(self.audit, JsonLinesSink):
            self.audit.close()


def _health(service: KmsService) -> tuple[int, dict[str, Any]]:
    """Per store: UNAVAILABLE unless CONNECTED; a connected store's HSM is pinged for real."""
    stores: dict[str, Any] = {}
    healthy = True
    for row in service.ctx.meta.list_key_stores(10_000, None):
        store = row.store
        entry: dict[str, Any] = {"ConnectionState": store.connection_state.value}
        backend = service.ctx.connections.peek(store.store_id)
        if store.connection_state is ConnectionState.CONNECTED and backend is not None:
            ping = backend.ping()
            entry.update(status="ACTIVE" if ping.ok else "UNAVAILABLE", latencyMs=ping.latency_ms)
            healthy = healthy and ping.ok
        elif store.connection_state is ConnectionState.CONNECTED:
            entry["status"] = "ACTIVE"  # logged in lazily on first use in this process
        else:
            entry["status"] = "UNAVAILABLE"
        stores[store.store_id] = entry
    return (200 if healthy else 503), {"status": "ok" if healthy else "degraded", "stores": stores}


def _audit_hook(audit: AuditSink) -> Any:
    def on_event(event: ApiEvent) -> None:
        audit.emit(
            AuditEvent(
                event_name=event.operation or "Unknown",
                event_time=time.time(),
                request_id=event.request_id,
                principal_arn=event.principal_arn,
                source_ip=event.source_ip,
                request_parameters=dict(event.params_redacted),
                error_code=event.error_code,
                additional={"status": event.status, "durationMs": round(event.duration_ms, 3)},
            )
        )

    return on_event


def create_app(
    settings: Settings,
    *,
    connector: HsmConnector | None = None,
    clock: Clock = time.time,
    audit: AuditSink | None = None,
    sweep_interval_s: float | None = 60.0,
    verify_signatures: bool = True,
) -> Runtime:
    """Build and start the service (start-up recovery included) and its ASGI app."""
    settings.apply_hsm_env()
    sink = audit or JsonLinesSink(settings.audit_log)
    service = open_service(
        settings, connector or Pkcs11Connector(settings.clusters), clock=clock, audit=sink
    )
    service.start(sweep_interval_s=sweep_interval_s)
    verifier = (
        SigV4Verifier.from_file(settings.credentials_file, settings.region)
        if verify_signatures
        else None
    )
    app = create_asgi_app(
        operations=build_operations(service),
        verifier=verifier,
        region=settings.region,
        max_request_bytes=settings.max_request_bytes,
        health=lambda: _health(service),
        on_event=_audit_hook(sink),
        handler_timeout_s=settings.request_timeout_s,
    )
    return Runtime(service, app, sink)
