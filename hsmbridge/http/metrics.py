"""Prometheus metrics for one app instance, on a private registry (never the global one).

Owns:
- `Metrics`: request counts by operation and outcome (error code or "ok"), request latency and
  HSM call latency histograms, HSM calls in flight, HSM call errors, and `render()` for /metrics.
- the `HsmCallObserver` side of `trail.hsm_calls.TimedConnector` (`hsm_call_started`,
  `hsm_call_finished`): each HSM call, timed once there, goes to the histogram and the in-flight
  gauge, so the backend itself needs no metrics code.
- `StoreCollector`: scrape-time gauges read from the live logins (sessions open, handle-cache
  hits and misses, retries from `Pkcs11Backend.stats`) and from the metadata (one gauge per store
  id and connection state, 1 for the current state).

Hot path: label children are created once per label tuple and cached in plain dicts, so a request
costs two dict lookups, one counter increment and one histogram observation.
Must not import: uvicorn, pkcs11 or the service layer (the collector is fed by callables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from hsmbridge.backend.pkcs11 import BackendStats
from hsmbridge.model import ConnectionState

REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
HSM_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
OK: Final = "ok"


class Metrics:
    """The app's metric families. One instance per app; thread-safe like prometheus_client."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "hsmbridge_requests", "KMS API requests by operation and outcome (error code or ok).",
            ["operation", "outcome"], registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "hsmbridge_request_duration_seconds", "KMS API request latency by operation.",
            ["operation"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self._hsm_latency = Histogram(
            "hsmbridge_hsm_call_duration_seconds", "Latency of one HSM backend call by call.",
            ["call"], buckets=HSM_BUCKETS, registry=r,
        )  # fmt: skip
        self._hsm_errors = Counter(
            "hsmbridge_hsm_call_errors", "HSM backend calls that raised, by call and error.",
            ["call", "error"], registry=r,
        )  # fmt: skip
        self.hsm_in_flight = Gauge(
            "hsmbridge_hsm_sessions_in_use",
            "HSM calls in progress; each holds one PKCS#11 worker session.",
            registry=r,
        )
        self._dispatch = Counter(
            "hsmbridge_request_dispatch",
            "Requests that may reach an HSM, by where their handler ran: inline (on the event "
            "loop), rerun (an inline attempt would have waited, so a worker thread ran it), "
            "thread.",
            ["ran"], registry=r,
        )  # fmt: skip
        self._dispatch_children = {
            ran: self._dispatch.labels(ran) for ran in ("inline", "rerun", "thread")
        }
        self._request_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}
        self._hsm_children: dict[str, Any] = {}

    def observe_request(self, operation: str, error_code: str | None, seconds: float) -> None:
        key = (operation, error_code or OK)
        counter = self._request_children.get(key)
        if counter is None:  # benign race: labels() returns the same child to both threads
            counter = self._request_children[key] = self._requests.labels(*key)
        counter.inc()
        hist = self._latency_children.get(operation)
        if hist is None:
            hist = self._latency_children[operation] = self._latency.labels(operation)
        hist.observe(seconds)

    def observe_dispatch(self, ran: str) -> None:
        self._dispatch_children[ran].inc()

    def observe_hsm(self, call: str, seconds: float, error: str | None) -> None:
        hist = self._hsm_children.get(call)
        if hist is None:
            hist = self._hsm_children[call] = self._hsm_latency.labels(call)
        hist.observe(seconds)
        if error is not None:  # rare: no child cache needed
            self._hsm_errors.labels(call, error).inc()

    def hsm_call_started(self) -> None:
        self.hsm_in_flight.inc()

    def hsm_call_refused(self) -> None:
        self.hsm_in_flight.dec()

    def hsm_call_finished(self, call: str, seconds: float, error: str | None) -> None:
        self.hsm_in_flight.dec()
        self.observe_hsm(call, seconds, error)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> tuple[bytes, str]:
        # generate_latest writes the classic text format (names are plain ASCII); label it 0.0.4,
        # which every Prometheus-compatible scraper parses, rather than the library's newest.
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


class StoreCollector(Collector):
    """Scrape-time view of the stores: `stores()` gives (store id, connection state) pairs and
    `backends()` (store id, live backend) pairs for this process's logins."""

    def __init__(
        self,
        stores: Callable[[], Iterable[tuple[str, ConnectionState]]],
        backends: Callable[[], Iterable[tuple[str, object]]],
    ) -> None:
        self._stores = stores
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        yield self._states()
        yield from self._backend_stats()

    def _states(self) -> Metric:
        states = GaugeMetricFamily(
            "hsmbridge_custom_key_store_state",
            "1 for the custom key store's current ConnectionState, 0 for the others.",
            labels=["custom_key_store_id", "state"],
        )
        for store_id, current in self._stores():
            for state in ConnectionState:
                states.add_metric([store_id, state.value], 1.0 if state is current else 0.0)
        return states

    def _backend_stats(self) -> Iterator[Metric]:
        labels = ["custom_key_store_id"]
        sessions = GaugeMetricFamily(
            "hsmbridge_hsm_sessions_open", "PKCS#11 sessions open (login + workers).", labels=labels
        )
        hits = CounterMetricFamily(
            "hsmbridge_hsm_handle_cache_hits", "Key handle cache hits.", labels=labels
        )
        misses = CounterMetricFamily(
            "hsmbridge_hsm_handle_cache_misses", "Key handle searches.", labels=labels
        )
        retries = CounterMetricFamily(
            "hsmbridge_hsm_retries", "Transient HSM errors retried by the backend.", labels=labels
        )
        for store_id, backend in self._backends():
            stats = getattr(backend, "stats", None)
            if isinstance(stats, BackendStats):  # fakes and other backends have no counters
                sessions.add_metric([store_id], stats.sessions_open)
                hits.add_metric([store_id], stats.handle_cache_hits)
                misses.add_metric([store_id], stats.handle_cache_misses)
                retries.add_metric([store_id], stats.retries)
        yield from (sessions, hits, misses, retries)
