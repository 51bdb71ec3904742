"""Composition root of the HTTP service: settings → KmsService → KMS ASGI app.

Owns: `create_app()`, the one place that wires the PKCS#11 connector (wrapped so every HSM call is
timed), the service, SigV4, the audit trail (one event per API call, into a buffered JSON-lines
file), `/metrics` (a private Prometheus registry) and the deep `/health` check together for
`hsmbridge serve`, the tests and the benchmark. It refuses to start over secret files other users
can read (`startup.check_secret_files`).
Must not import pkcs11 directly (the backend package does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hsmbridge.api.app import ApiEvent, KmsApi, create_asgi_app
from hsmbridge.api.auth import SigV4Verifier
from hsmbridge.api.health import HealthChecker
from hsmbridge.api.metrics import Metrics, StoreCollector, TimedConnector
from hsmbridge.api.operations import build_operations
from hsmbridge.api.startup import check_secret_files
from hsmbridge.audit.events import AuditEvent, AuditSink, redact
from hsmbridge.audit.sinks import BufferedJsonLinesSink, RequestAwareSink
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
    metrics: Metrics
    health: HealthChecker

    def close(self) -> None:
        self.app.close()
        self.service.close()
        close = getattr(self.audit, "close", None)
        if callable(close):  # the file sink flushes its buffer; a caller's MemorySink has none
            close()


def _on_event(audit: AuditSink, metrics: Metrics) -> Callable[[ApiEvent], None]:
    """The per-request hook: one metrics observation and one audit event, both cheap."""

    def on_event(event: ApiEvent) -> None:
        operation = event.operation or "Unknown"
        metrics.observe_request(operation, event.error_code, event.duration_ms / 1000.0)
        additional = {"status": event.status, "durationMs": round(event.duration_ms, 3)}
        additional.update(event.additional or {})
        audit.emit(
            AuditEvent(
                event_name=operation,
                event_time=time.time(),
                request_id=event.request_id,
                principal_arn=event.principal_arn,
                source_ip=event.source_ip,
                # Second, model-independent pass: the app already hid the model's sensitive
                # members; this also hides the names hsmbridge treats as secret everywhere.
                request_parameters=redact(event.params_redacted),
                key_arn=event.key_arn,
                custom_key_store_id=event.custom_key_store_id,
                error_code=event.error_code,
                hsm_latency_ms=event.hsm_latency_ms,
                additional=additional,
            )
        )

    return on_event


def _store_collector(service: KmsService) -> StoreCollector:
    def stores() -> Iterator[tuple[str, ConnectionState]]:
        for row in service.ctx.meta.list_key_stores(10_000, None):
            yield row.store.store_id, row.store.connection_state

    def backends() -> Iterator[tuple[str, object]]:
        connections = service.ctx.connections
        for store_id in connections.live_store_ids():
            backend = connections.peek(store_id)
            if backend is not None:
                yield store_id, backend

    return StoreCollector(stores, backends)


def create_app(
    settings: Settings,
    *,
    connector: HsmConnector | None = None,
    clock: Clock = time.time,
    audit: AuditSink | None = None,
    sweep_interval_s: float | None = 60.0,
    verify_signatures: bool = True,
    health_ttl_s: float = 30.0,
    health_slow_ms: float = 250.0,
    health_clock: Callable[[], float] = time.monotonic,
    recover: bool = True,
) -> Runtime:
    """Build and start the service (start-up recovery included) and its ASGI app.

    `recover=False` (with `sweep_interval_s=None`) builds a worker of a multi-process server:
    `start_maintenance` did recovery in the supervisor and runs the sweeper there.

    Raises ConfigError before touching anything if a secret file is group- or world-accessible.
    """
    check_secret_files(settings)
    settings.apply_hsm_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sink = audit or BufferedJsonLinesSink(settings.audit_log)
    metrics = Metrics()
    timed = TimedConnector(connector or Pkcs11Connector(settings.clusters), metrics)
    service = open_service(settings, timed, clock=clock, audit=RequestAwareSink(sink))
    service.start(sweep_interval_s=sweep_interval_s, recover=recover)
    metrics.add_collector(_store_collector(service))
    health = HealthChecker(service, ttl_s=health_ttl_s, slow_ms=health_slow_ms, clock=health_clock)
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
        health=health,
        metrics=metrics.render,
        on_event=_on_event(sink, metrics),
        handler_timeout_s=settings.request_timeout_s,
    )
    return Runtime(service, app, sink, metrics, health)


@dataclass
class Maintenance:
    """The supervisor's own service of a multi-process server: recovery, then the sweeper."""

    service: KmsService
    audit: BufferedJsonLinesSink

    def close(self) -> None:
        self.service.close()
        self.audit.close()


def start_maintenance(settings: Settings, *, sweep_interval_s: float | None = 60.0) -> Maintenance:
    """Run start-up recovery once and start the deletion sweeper, for `serve` with workers.

    Call it before any worker starts (recovery rolls back CreateKeys in flight). Its HSM login
    is this process's own; workers are spawned, not forked, so none inherits it (field notes
    §2.1). Sweeper events go to the same audit file as the workers' (O_APPEND, whole lines).
    """
    check_secret_files(settings)
    settings.apply_hsm_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sink = BufferedJsonLinesSink(settings.audit_log)
    service = open_service(
        settings, Pkcs11Connector(settings.clusters), audit=RequestAwareSink(sink)
    )
    try:
        service.start(sweep_interval_s=sweep_interval_s)
    except BaseException:
        service.close()
        sink.close()
        raise
    return Maintenance(service, sink)
