"""Test-only launcher: the production server (`create_app` + `serve`) with kill points and a clock.

Run as a script (never imported by pytest's collection):

    python tests/reliability/crash_server.py --config D/hsmbridge.toml --port N \
        [--crash-at POINT --crash-hit K --marker FILE] [--clock-offset-days D --clock-speed S]
        [--sweep-interval S] [--stats-file F] [--clock-start-wall W --clock-start-mono M]

It is `hsmbridge serve` with two test seams passed through the composition root's own parameters,
so production code carries no hooks:

* the PKCS#11 connector is wrapped; at the K-th time (counted after start-up) the server reaches
  POINT it appends "HIT POINT" to FILE and blocks forever, so the test can SIGKILL it exactly
  there. Points: before_hsm_create / after_hsm_create (around `generate_key`, i.e. before the HSM
  call and between the HSM call and the metadata commit), before_hsm_destroy / after_hsm_destroy
  (around `destroy_key` during the final deletion), in_connect (inside the login of
  ConnectCustomKeyStore) and in_disconnect (closing the login during DisconnectCustomKeyStore).
  Start-up itself (recovery, the start-up sweep) is never interrupted: it is what is under test.
* the service clock is `time.time() + offset + speed * elapsed`, so waiting periods of
  ScheduleKeyDeletion pass in seconds and the deletion sweeper runs during the test. With
  --clock-start-wall W --clock-start-mono M the clock is `W + offset + speed * (monotonic() - M)`
  instead: CLOCK_MONOTONIC is system-wide on Linux, so instances given the same W and M keep one
  virtual time between them (for several instances sharing a database).

With --stats-file it appends one JSON line per second: PKCS#11 sessions open (backend stats) and
VmRSS of this process, for the load test's leak check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hsmbridge import bootstrap
from hsmbridge.backend import HsmConnector
from hsmbridge.config import load_settings
from hsmbridge.http.compose import Runtime, create_app
from hsmbridge.http.server import serve
from hsmbridge.model import ConnectionState

DAY = 86_400.0
POINTS = (
    "before_hsm_create",
    "after_hsm_create",
    "before_hsm_destroy",
    "after_hsm_destroy",
    "in_connect",
    "in_disconnect",
)


class KillPoints:
    """Counts arrivals at the chosen point once armed; the K-th arrival reports and blocks."""

    def __init__(self, point: str | None, hit: int, marker: Path | None) -> None:
        self.point, self.hit, self.marker = point, hit, marker
        self.armed = False
        self._count = 0
        self._lock = threading.Lock()

    def reached(self, name: str) -> None:
        if not self.armed or name != self.point:
            return
        with self._lock:
            self._count += 1
            if self._count != self.hit:
                return
        assert self.marker is not None
        with self.marker.open("a", encoding="utf-8") as fh:
            fh.write(f"HIT {name}\n")
            fh.flush()
            os.fsync(fh.fileno())
        threading.Event().wait()  # until SIGKILL; nothing after this line ever runs


class CrashingBackend:
    """Delegates to the real Pkcs11Backend, passing through the kill points on the way."""

    def __init__(self, inner: Any, points: KillPoints) -> None:
        self._inner = inner
        self._points = points

    def generate_key(self, label: str, key_id: bytes, **kwargs: Any) -> Any:
        self._points.reached("before_hsm_create")
        info = self._inner.generate_key(label, key_id, **kwargs)
        self._points.reached("after_hsm_create")
        return info

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        self._points.reached("before_hsm_destroy")
        count = self._inner.destroy_key(label, handle)
        self._points.reached("after_hsm_destroy")
        return int(count)

    def close(self) -> None:
        self._points.reached("in_disconnect")
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CrashingConnector:
    def __init__(self, inner: HsmConnector, points: KillPoints) -> None:
        self._inner = inner
        self._points = points
        self.backends: list[CrashingBackend] = []
        self.runtime: Runtime | None = None

    def _connecting(self, cluster_id: str) -> bool:
        assert self.runtime is not None
        rows = self.runtime.service.ctx.meta.list_key_stores(10_000, None)
        return any(
            r.store.cluster_id == cluster_id
            and r.store.connection_state is ConnectionState.CONNECTING
            for r in rows
        )

    def connect(self, cluster_id: str, password: str) -> CrashingBackend:
        # Only the login of ConnectCustomKeyStore is a kill point; a store that is CONNECTED in
        # the metadata also logs in lazily on its first request after a restart.
        if self.runtime is not None and self._connecting(cluster_id):
            self._points.reached("in_connect")
        backend = CrashingBackend(self._inner.connect(cluster_id, password), self._points)
        self.backends.append(backend)
        return backend

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        self._inner.change_password(cluster_id, old, new)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def _write_stats(runtime: Runtime, path: Path, interval: float) -> None:
    start = time.monotonic()
    connections = runtime.service.ctx.connections
    meta = runtime.service.ctx.meta
    while True:
        sessions = keys = 0
        for store_id in connections.live_store_ids():
            backend = connections.peek(store_id)
            if backend is not None:
                sessions += backend.stats.sessions_open
            keys += meta.count_keys_in_store(store_id)
        line = {
            "t": time.monotonic() - start,
            "sessions_open": sessions,
            "rss_kb": _rss_kb(),
            "keys": keys,  # RSS follows the token's object count (SoftHSM caches each object)
        }
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        time.sleep(interval)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--crash-at", choices=POINTS)
    p.add_argument("--crash-hit", type=int, default=1)
    p.add_argument("--marker", type=Path)
    p.add_argument("--clock-offset-days", type=float, default=0.0)
    p.add_argument("--clock-speed", type=float, default=1.0, help="virtual seconds per second")
    p.add_argument("--sweep-interval", type=float, default=60.0)
    p.add_argument("--stats-file", type=Path)
    p.add_argument("--health-ttl", type=float, help="seconds /health caches its HSM round trip")
    p.add_argument("--clock-start-wall", type=float, help="wall time (epoch s) the clock starts at")
    p.add_argument(
        "--clock-start-mono", type=float, help="time.monotonic() at which it is --clock-start-wall"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if (args.clock_start_wall is None) != (args.clock_start_mono is None):
        raise SystemExit("--clock-start-wall and --clock-start-mono go together")
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = load_settings(args.config)
    points = KillPoints(args.crash_at, args.crash_hit, args.marker)
    connector = CrashingConnector(bootstrap.default_connector(settings), points)
    wall0, mono0 = time.time(), time.monotonic()
    if args.clock_start_wall is not None:  # a virtual time shared with other processes
        wall0, mono0 = args.clock_start_wall, args.clock_start_mono
    offset = args.clock_offset_days * DAY

    def clock() -> float:
        return wall0 + offset + (time.monotonic() - mono0) * args.clock_speed

    extra: dict[str, Any] = {}
    if args.health_ttl is not None:
        extra["health_ttl_s"] = args.health_ttl
    runtime = create_app(
        settings, connector=connector, clock=clock, sweep_interval_s=args.sweep_interval, **extra
    )
    connector.runtime = runtime
    points.armed = True  # start-up recovery and the start-up sweep are done
    if args.stats_file is not None:
        threading.Thread(
            target=_write_stats, args=(runtime, args.stats_file, 1.0), daemon=True
        ).start()
    try:
        serve(
            runtime.app,
            "127.0.0.1",
            args.port,
            request_timeout_s=settings.request_timeout_s,
            max_request_bytes=settings.max_request_bytes,
        )
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
