"""The worker side of a multi-process `hsmbridge serve`: the app factory each worker calls.

Owns: `app_from_env()` (import string `FACTORY`), `worker_environment()` (what the supervisor
puts in the environment for it) and `default_workers()`.

Design (see `http.server.serve_workers` for the supervisor):
* Each worker is a fresh interpreter (uvicorn spawns them), so PKCS#11 is initialised in the
  worker, after the fork, never inherited; each logs in once per token.
* Workers neither recover nor sweep: the supervisor ran recovery before starting them and runs
  the sweeper (`compose.start_maintenance`). A ConnectCustomKeyStore runs in the worker that
  took the request; the others log in lazily when they see the store CONNECTED in the DB.
* uvicorn ends a worker by re-raising SIGTERM after its graceful shutdown, so the worker's
  cleanup (flush the audit buffer, log out, close the DB) runs at lifespan shutdown instead.
* A worker dies with its supervisor (PR_SET_PDEATHSIG): a SIGKILLed supervisor must not leave
  workers serving the port.
Must not import pkcs11.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Final

from uvicorn.config import STARTUP_FAILURE

from hsmbridge.config import load_settings
from hsmbridge.http.app import KmsApi
from hsmbridge.http.compose import create_app
from hsmbridge.http.logs import configure_logging
from hsmbridge.http.server import tune_gc_for_serving

log = logging.getLogger(__name__)

FACTORY: Final = "hsmbridge.http.workers:app_from_env"
ENV_CONFIG: Final = "HSMBRIDGE_CONFIG"
ENV_LOG_FORMAT: Final = "HSMBRIDGE_LOG_FORMAT"
ENV_LOG_LEVEL: Final = "HSMBRIDGE_LOG_LEVEL"
ENV_SUPERVISOR: Final = "HSMBRIDGE_SUPERVISOR_PID"
ENV_WORKERS: Final = "HSMBRIDGE_WORKERS"  # each worker enforces its share of `[quotas]`
MAX_DEFAULT_WORKERS: Final = 8  # beyond this the SQLite writer lock and HSM sessions dominate
_PR_SET_PDEATHSIG: Final = 1


def default_workers() -> int:
    """One worker per CPU this process may run on, capped: CPython is bound by one core each."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_WORKERS))


def worker_environment(
    config_path: str, *, json_logs: bool, log_level: int, workers: int
) -> dict[str, str]:
    """Environment variables the supervisor sets before it spawns workers (they inherit it)."""
    return {
        ENV_CONFIG: config_path,
        ENV_WORKERS: str(workers),
        ENV_LOG_FORMAT: "json" if json_logs else "text",
        ENV_LOG_LEVEL: str(log_level),
        ENV_SUPERVISOR: str(os.getpid()),
    }


def _die_with_supervisor() -> None:
    supervisor = int(os.environ.get(ENV_SUPERVISOR, "0"))
    if not supervisor or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # SIGTERM: the orphan still shuts down cleanly
    if os.getppid() != supervisor:  # it died before prctl took effect
        raise SystemExit(STARTUP_FAILURE)


def app_from_env() -> KmsApi:
    """uvicorn's app factory in a worker process; exits STARTUP_FAILURE if it cannot start,
    which stops the supervisor instead of restarting the worker forever."""
    _die_with_supervisor()
    level = int(os.environ.get(ENV_LOG_LEVEL, str(logging.WARNING)))
    configure_logging(level, json_format=os.environ.get(ENV_LOG_FORMAT) == "json")
    try:
        settings = load_settings(os.environ[ENV_CONFIG])
        workers = int(os.environ.get(ENV_WORKERS, "0")) or None
        runtime = create_app(
            settings, recover=False, sweep_interval_s=None, server_processes=workers
        )
    except Exception:
        log.exception("worker %d could not start", os.getpid())
        raise SystemExit(STARTUP_FAILURE) from None
    runtime.app.on_shutdown = runtime.close
    tune_gc_for_serving()
    log.info("worker %d serving", os.getpid())
    return runtime.app
