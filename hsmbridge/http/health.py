"""The deep health check behind `GET /health`: a real HSM round trip per connected store, cached.

Owns: `HealthChecker`. Per custom key store it reports one of
- ACTIVE: CONNECTED, the HSM answered a random draw (`backend.ping()`) within `slow_ms`, and the
  cluster inventory still shows the quorum CreateKey needs (2 ACTIVE HSMs in 2 AZs);
- DEGRADED: usable but not healthy: the ping was slow, the inventory shows fewer than 2 ACTIVE
  HSMs in 2 AZs (or cannot be read), the backend had to recover sessions or the login since the
  previous check (its retry counter moved), or the store is CONNECTING (login being established);
- UNAVAILABLE: not usable: not connected (DISCONNECTED, DISCONNECTING, FAILED), the login failed,
  or the ping failed.
Overall: HTTP 200 when every CONNECTED store is ACTIVE, else 503. Stores an operator left
disconnected are reported but do not fail the check. The whole report is cached for `ttl_s`
(at most 60 s) on an injectable monotonic clock, so a load balancer polling every second costs
one HSM call per store per TTL.
A check (a probe) runs in a thread of its own, one at a time, and a caller waits for it at most
`answer_within_s` (1.5 s): a slow or stuck HSM cannot make `/health` slow. A caller that stops
waiting gets the last finished report, with the store the probe is still waiting for marked
UNAVAILABLE ("has not answered for N s"), and 503. Each ping waits for the HSM (a session, the
library lock, the store's bulkhead) no longer than the probe's deadline.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from hsmbridge import deadline
from hsmbridge.backend import HsmBackend
from hsmbridge.errors import KmsError
from hsmbridge.keystore import quorum
from hsmbridge.keystore.inventory import InventoryUnavailableError
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionState
from hsmbridge.service.kms import KmsService
from hsmbridge.trail.events import iso_time

ACTIVE: Final = "ACTIVE"
DEGRADED: Final = "DEGRADED"
UNAVAILABLE: Final = "UNAVAILABLE"
MAX_TTL_S: Final = 60.0
ANSWER_WITHIN_S: Final = 1.5  # a caller waits this long for a running probe, then is answered
PING_DEADLINE_S: Final = 5.0  # a ping waits this long for a session, lock or bulkhead slot
_RANK: Final = {ACTIVE: 0, DEGRADED: 1, UNAVAILABLE: 2}

log = logging.getLogger(__name__)


@dataclass
class _Probe:
    """One run of the check: when it started, the store it is at, and its result when done."""

    started: float
    store_id: str | None = None
    result: tuple[int, dict[str, Any]] | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class StoreHealth:
    status: str
    detail: str
    latency_ms: float | None = None

    def to_dict(self, state: ConnectionState) -> dict[str, Any]:
        return {
            "status": self.status,
            "connectionState": state.value,
            "detail": self.detail,
            "pingLatencyMs": None if self.latency_ms is None else round(self.latency_ms, 3),
        }


class HealthChecker:
    """Callable as the app's `health` hook: returns (HTTP status, JSON document)."""

    def __init__(
        self,
        service: KmsService,
        *,
        ttl_s: float = 30.0,
        slow_ms: float = 250.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        answer_within_s: float = ANSWER_WITHIN_S,
        ping_deadline_s: float = PING_DEADLINE_S,
    ) -> None:
        if not 0 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"health cache TTL must be 0-{MAX_TTL_S:.0f} s, got {ttl_s}")
        self._service = service
        self._ttl = ttl_s
        self._slow_ms = slow_ms
        self._clock = clock
        self._wall = wall_clock
        self._answer_within = answer_within_s
        self._ping_deadline = ping_deadline_s
        self._lock = threading.Lock()  # guards the fields below
        self._cached: tuple[float, int, dict[str, Any]] | None = None
        self._probe: _Probe | None = None  # the probe running now, if any
        self._retries_seen: dict[str, int] = {}

    def __call__(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._cached is not None and self._clock() < self._cached[0]:
                _, status, doc = self._cached
                return status, {**doc, "cached": True}
            probe = self._probe
            if probe is None:
                probe = self._probe = _Probe(time.monotonic())
                threading.Thread(
                    target=self._run_probe, args=(probe,), name="health-probe", daemon=True
                ).start()
        if probe.done.wait(self._answer_within):
            assert probe.result is not None
            status, doc = probe.result
            return status, {**doc, "cached": False}
        return self._overdue(probe)

    def _run_probe(self, probe: _Probe) -> None:
        try:
            status, doc = self._check(probe)
        except Exception as exc:  # the metadata store failed: unhealthy, and said so
            log.exception("health probe failed")
            status = 503
            doc = {
                "status": UNAVAILABLE,
                "checkedAt": iso_time(self._wall()),
                "detail": f"health probe failed: {type(exc).__name__}",
                "stores": {},
            }
        with self._lock:
            probe.result = (status, doc)
            self._cached = (self._clock() + self._ttl, status, doc)
            self._probe = None
        probe.done.set()

    def _overdue(self, probe: _Probe) -> tuple[int, dict[str, Any]]:
        """The answer while a probe is slower than `answer_within_s`: the last report, with the
        store the probe waits on marked UNAVAILABLE."""
        waited = time.monotonic() - probe.started
        with self._lock:
            last = self._cached
            store_id = probe.store_id
        doc: dict[str, Any] = dict(last[2]) if last else {"status": UNAVAILABLE, "stores": {}}
        stores = dict(doc.get("stores", {}))
        if store_id is not None:
            stores[store_id] = {
                **stores.get(store_id, {}),
                "status": UNAVAILABLE,
                "detail": f"the HSM has not answered a health probe for {waited:.1f} s",
            }
        doc.update(
            status=UNAVAILABLE,
            stores=stores,
            probeRunningS=round(waited, 3),
            cached=True,
        )
        return 503, doc

    def _check(self, probe: _Probe) -> tuple[int, dict[str, Any]]:
        stores: dict[str, Any] = {}
        worst = ACTIVE
        for row in self._service.ctx.meta.list_key_stores(10_000, None):
            state = row.store.connection_state
            probe.store_id = row.store.store_id
            with deadline.within(self._ping_deadline):
                health = self._store(row)
            probe.store_id = None
            stores[row.store.store_id] = health.to_dict(state)
            if state is ConnectionState.CONNECTED and _RANK[health.status] > _RANK[worst]:
                worst = health.status
        doc = {"status": worst, "checkedAt": iso_time(self._wall()), "stores": stores}
        return (200 if worst == ACTIVE else 503), doc

    def _store(self, row: StoredKeyStore) -> StoreHealth:
        store = row.store
        state = store.connection_state
        if state is ConnectionState.CONNECTING:
            return StoreHealth(DEGRADED, "login to the HSM is being established")
        if state is not ConnectionState.CONNECTED:
            code = store.connection_error_code
            why = f" ({code.value})" if code is not None else ""
            return StoreHealth(UNAVAILABLE, f"custom key store is {state.value}{why}")
        try:
            backend = self._service.hsm.login(row)
        except KmsError as exc:
            # Class name only: login errors are safe to show, but nothing here needs more.
            return StoreHealth(UNAVAILABLE, f"login to the HSM failed: {type(exc).__name__}")
        ping = backend.ping()
        if not ping.ok:
            return StoreHealth(UNAVAILABLE, f"HSM ping failed: {ping.detail}", ping.latency_ms)
        problem = self._degradation(store.store_id, store.cluster_id, backend, ping.latency_ms)
        if problem:
            return StoreHealth(DEGRADED, problem, ping.latency_ms)
        return StoreHealth(ACTIVE, "HSM answered a random draw", ping.latency_ms)

    def _degradation(
        self, store_id: str, cluster_id: str, backend: HsmBackend, latency_ms: float
    ) -> str:
        """Every reason the store is DEGRADED, joined; "" if none. All are checked each time:
        a slow ping on a busy machine must not hide a cluster below quorum."""
        problems = []
        if latency_ms > self._slow_ms:
            problems.append(f"HSM ping took {latency_ms:.0f} ms (threshold {self._slow_ms:.0f} ms)")
        stats = getattr(backend, "stats", None)
        retries = getattr(stats, "retries", None)
        if isinstance(retries, int):
            before = self._retries_seen.get(store_id, retries)
            self._retries_seen[store_id] = retries
            if retries > before:
                problems.append(
                    f"HSM sessions or login re-established {retries - before}x since last check"
                )
        quorum_problem = self._quorum_problem(cluster_id)
        if quorum_problem:
            problems.append(quorum_problem)
        return "; ".join(problems)

    def _quorum_problem(self, cluster_id: str) -> str:
        try:
            cluster = self._service.ctx.inventory.describe(cluster_id)
        except InventoryUnavailableError:
            return "the cluster inventory is unavailable"
        if cluster is None:
            return f"cluster {cluster_id} is missing from the inventory"
        verdict = quorum.check(quorum.Operation.CREATE_KEY, cluster)
        return "" if verdict.ok else f"cluster below CreateKey quorum: {verdict.message}"
