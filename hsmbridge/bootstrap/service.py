"""The `KmsService` over everything the configuration names: the one way to open the service.

Owns: `open_service(settings, ...)`: start-up checks and host preparation (`prepare`), then the
metadata store, cluster inventory, password vault, HSM connections and request quotas wired into
one `ServiceContext`, and the `KmsService` over it. Nothing is started: the caller decides about
start-up recovery and the deletion sweeper (`KmsService.start`). Each dependency can be injected
(a connector, a clock, an audit sink, a metadata store), so tests, the CLI, the HTTP server and
the benchmarks build the same service from the same code.
Must not import uvicorn or pkcs11 directly.
"""

from __future__ import annotations

import os
import time

from hsmbridge.backend import HsmConnector
from hsmbridge.bootstrap.connector import default_connector
from hsmbridge.bootstrap.host import prepare
from hsmbridge.bootstrap.metadata import open_metadata_store
from hsmbridge.config import Settings
from hsmbridge.keystore.inventory import inventory_from_settings
from hsmbridge.keystore.master_key import load_master_key
from hsmbridge.keystore.passwords import PasswordVault
from hsmbridge.metadata.store import MetadataStore
from hsmbridge.service.connections import Monotonic, StoreConnections
from hsmbridge.service.context import Clock, ServiceContext
from hsmbridge.service.kms import KmsService
from hsmbridge.service.login_budget import LoginBudget
from hsmbridge.service.quotas import MonotonicClock, quotas_from_settings
from hsmbridge.trail.events import AuditSink, NullSink


def open_service(
    settings: Settings,
    *,
    connector: HsmConnector | None = None,
    clock: Clock = time.time,
    audit: AuditSink | None = None,
    meta: MetadataStore | None = None,
    synchronous_connect: bool = False,
    quota_clock: MonotonicClock = time.monotonic,
    server_processes: int | None = None,
    login_clock: Monotonic = time.monotonic,
) -> KmsService:
    """Build a KmsService; the caller closes it. `audit=None` records nothing (a NullSink):
    entry points that keep the audit trail open it with `open_audit_log` and pass it here.

    `server_processes`: how many processes serve the endpoint, each enforcing that share of the
    `[quotas]` rates; None: `[service] workers`, else 1. `hsmbridge serve` passes the number of
    processes it actually runs (`--workers`, or one per CPU by default).

    Raises ConfigError before touching anything if a secret file is group- or world-accessible.
    """
    prepare(settings)
    store = meta or open_metadata_store(settings)
    try:
        ctx = ServiceContext(
            settings=settings,
            meta=store,
            # The service's clock: delayed HSM transitions are stamped with it by the CloudHSM API.
            inventory=inventory_from_settings(settings.inventory, clock),
            vault=_vault(settings),
            connections=StoreConnections(
                connector or default_connector(settings),
                LoginBudget(store, settings),
                login_clock,  # the failed-login backoff's clock (tests move it)
            ),
            clock=clock,
            audit=audit or NullSink(),
            quotas=quotas_from_settings(
                settings.quotas,
                processes=server_processes or settings.workers or 1,
                clock=quota_clock,
            ),
        )
        return KmsService(ctx, synchronous_connect=synchronous_connect)
    except BaseException:
        if meta is None:  # ours to close; an injected store stays the caller's
            store.close()
        raise


def _vault(settings: Settings) -> PasswordVault:
    """The password vault over the master key from wherever the configuration says."""
    master = load_master_key(settings.master_key_file, settings.master_key_command, os.environ)
    return PasswordVault(master.source, key=master.key)
