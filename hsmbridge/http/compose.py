"""The HTTP service's own wiring over `hsmbridge.bootstrap`: settings → KmsService → KMS ASGI app.

Owns: `create_app()` and `start_maintenance()`, which take the service, the default connector and
the audit trail file from `hsmbridge.bootstrap` (which also refuses to start over secret files
other users can read) and add what only HTTP needs: the connector wrapped so every HSM call is
timed and passes its store's bulkhead, SigV4 (with STS temporary credentials), STS on the same
endpoint (`bootstrap.sessions`: the server key in `sts.key` and the STS service over the IAM
directory), the CloudHSM v2 API (`service.cloudhsm` over the static inventory file; refused when
the inventory is the real CloudHSM API), one audit event per API call, `/metrics` (a private
Prometheus registry) and the deep `/health` check, both optionally behind a bearer token, for
`hsmbridge serve`, the tests and the benchmark.
Must not import pkcs11 directly (the backend package does).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from hsmbridge import bootstrap
from hsmbridge.backend import HsmConnector
from hsmbridge.backend.bulkhead import BulkheadConnector, BulkheadLimits
from hsmbridge.bootstrap.ops_token import read_ops_token
from hsmbridge.bootstrap.sessions import open_session_issuer, open_sts_service
from hsmbridge.config import Settings
from hsmbridge.console.compose import build_console
from hsmbridge.http.app import KmsApi, create_asgi_app
from hsmbridge.http.health import HealthChecker
from hsmbridge.http.metrics import Metrics, StoreCollector
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.keystore.inventory_file import InventoryFile
from hsmbridge.model import ConnectionState
from hsmbridge.protocol.cloudhsm import (
    CloudHsmEndpoint,
    build_cloudhsm_endpoint,
    unavailable_endpoint,
)
from hsmbridge.protocol.operations import HSM_OPERATIONS, INLINE_OPERATIONS, build_operations
from hsmbridge.protocol.sts import build_sts_operations
from hsmbridge.service.cloudhsm import CloudHsmService
from hsmbridge.service.context import Clock
from hsmbridge.service.kms import KmsService
from hsmbridge.trail.calls import ApiEvent, audit_event
from hsmbridge.trail.events import AuditSink
from hsmbridge.trail.hsm_calls import TimedConnector
from hsmbridge.trail.sinks import BufferedJsonLinesSink, RequestAwareSink

HSM_THREADS: Final = 32  # worker threads for operations that may reach an HSM


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
        if callable(close):  # the file sink flushes its buffer; a caller's own sink may have none
            close()


def _on_event(audit: AuditSink, metrics: Metrics) -> Callable[[ApiEvent], None]:
    """The per-request hook: one metrics observation and one audit event, both cheap."""

    def on_event(event: ApiEvent) -> None:
        operation = event.operation or "Unknown"
        metrics.observe_request(operation, event.error_code, event.duration_ms / 1000.0)
        if event.ran is not None:
            metrics.observe_dispatch(event.ran)
        audit.emit(audit_event(event))

    return on_event


def _inline_operations(settings: Settings) -> frozenset[str]:
    """The operations tried on the event loop first: the cryptographic ones, when enabled, the
    metadata is a local SQLite file (PostgreSQL reads cross the network) and some cluster's
    profile allows `inline_calls`. Whether one store's HSM may be called there is its profile's
    business (the backend refuses otherwise); with none that may, no request is tried inline."""
    if not settings.inline_hsm_calls or settings.metadata_db is None:
        return frozenset()
    if not any(binding.profile.inline_calls for binding in settings.clusters.values()):
        return frozenset()
    return INLINE_OPERATIONS


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


def _cloudhsm_endpoint(settings: Settings, service: KmsService, clock: Clock) -> CloudHsmEndpoint:
    """The CloudHSM v2 API over the static inventory file (the source of truth the KMS service
    reads too); with the `cloudhsm` provider the real CloudHSM API is, so every call is refused."""
    inventory = settings.inventory
    if inventory.provider != "static" or inventory.path is None:
        return unavailable_endpoint(
            "This hsmbridge does not serve the CloudHSM v2 API: its cluster inventory is the real"
            ' CloudHSM API ([inventory] provider = "cloudhsm"); call that instead.'
        )
    # The service's clock: HSM transitions run on the time the service keeps (tests move it).
    cloudhsm = CloudHsmService(
        service.ctx,
        InventoryFile(inventory.path, clock=clock),
        transition_delay_s=inventory.hsm_transition_delay_s,
    )
    return build_cloudhsm_endpoint(cloudhsm)


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
    server_processes: int | None = None,
) -> Runtime:
    """Build and start the service (start-up recovery included) and its ASGI app.

    `recover=False` (with `sweep_interval_s=None`) builds a worker of a multi-process server:
    `start_maintenance` did recovery in the supervisor and runs the sweeper there.
    `server_processes`: how many processes serve the endpoint (each enforces that share of the
    `[quotas]` rates); None: `[service] workers`, else 1.

    Raises ConfigError before touching anything if a secret file is group- or world-accessible.
    """
    ops_token = read_ops_token(settings)  # a bad token file stops start-up before anything opens
    sink = audit or bootstrap.open_buffered_audit_log(settings)
    metrics = Metrics()
    # Each store's login gets a bulkhead sized from the HSM worker threads, inside the timing
    # wrapper so a call refused by the bulkhead is counted like any failed HSM call.
    guarded = BulkheadConnector(
        connector or bootstrap.default_connector(settings),
        BulkheadLimits.for_threads(HSM_THREADS),
    )
    timed = TimedConnector(guarded, metrics)
    service = bootstrap.open_service(
        settings,
        connector=timed,
        clock=clock,
        audit=RequestAwareSink(sink),
        server_processes=server_processes,
    )
    service.start(sweep_interval_s=sweep_interval_s, recover=recover)
    metrics.add_collector(_store_collector(service))
    health = HealthChecker(service, ttl_s=health_ttl_s, slow_ms=health_slow_ms, clock=health_clock)
    try:
        issuer = open_session_issuer(settings)
    except BaseException:
        service.close()
        raise
    # STS shares the service's clock and IAM directory: sessions expire by the same time the
    # service keeps (tests move it), and policies are read from one cache.
    sts = open_sts_service(settings, iam=service.ctx.iam, issuer=issuer, clock=clock)
    cloudhsm = _cloudhsm_endpoint(settings, service, clock)
    # One read of the credentials file for both edges that authenticate with it: SigV4 and the
    # web console's sign-in.
    credentials = load_principals(settings.credentials_file)
    verifier = (
        SigV4Verifier(
            credentials,
            settings.region,
            sessions=issuer,
            session_clock=lambda: datetime.fromtimestamp(clock(), UTC),
        )
        if verify_signatures
        else None
    )
    on_event = _on_event(sink, metrics)
    app = create_asgi_app(
        operations=build_operations(service),
        verifier=verifier,
        region=settings.region,
        max_request_bytes=settings.max_request_bytes,
        sts_operations=build_sts_operations(sts),
        cloudhsm_endpoint=cloudhsm,
        health=health,
        metrics=metrics.render,
        on_event=on_event,
        handler_timeout_s=settings.request_timeout_s,
        anonymous_account=settings.account_id,
        worker_threads=HSM_THREADS,
        hsm_operations=HSM_OPERATIONS,
        inline_operations=_inline_operations(settings),
        ops_token=ops_token,
        max_connections_per_client=settings.max_connections_per_client,
        console=build_console(settings, service, credentials, on_event),
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
    is this process's own; workers are spawned, not forked, so none inherits it (a PKCS#11
    library initialised before a fork is unusable in the child). Sweeper events go to the same
    audit file as the workers' (O_APPEND, whole lines).
    """
    # The STS key first: workers then all read the one the supervisor made (they would agree on
    # one anyway, see bootstrap.sessions), and a bad key file stops the server before they start.
    open_session_issuer(settings)
    sink = bootstrap.open_buffered_audit_log(settings)
    service = bootstrap.open_service(settings, audit=RequestAwareSink(sink))
    try:
        service.start(sweep_interval_s=sweep_interval_s)
    except BaseException:
        service.close()
        sink.close()
        raise
    return Maintenance(service, sink)
