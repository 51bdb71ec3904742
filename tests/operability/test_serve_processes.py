"""`python -m hsmbridge serve` as a subprocess: signals end it cleanly, with one or N workers.

Over an environment made by `python -m hsmbridge init --data-dir D` (its own SoftHSM token):
a few boto3 calls, SIGTERM or SIGINT, then the exit code must be 0 and every call's audit event
must be in D/audit.jsonl (the audit buffer is flushed at shutdown, not lost with the process).

With workers, what the README promises is observed from outside (`tests.operability.processes`):
the process that answered a connection is read from /proc, what the server did from its log and
from the token (pkcs11-tool) and the metadata. Start-up recovery runs once, in the supervisor,
before any worker exists; every worker serves and logs in to the token once, while serving;
/metrics and /health describe the worker that answered; every line of the one audit file that
several processes append to parses; no worker outlives the supervisor (SIGTERM or SIGKILL); a
killed worker is replaced (and the replacement does not recover); a worker that cannot start
stops the server with exit code 1.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hsmbridge.model import KeyLifecycle
from tests.operability.processes import (
    Answer,
    ServerLog,
    audit_events,
    calls,
    create_key,
    encrypts_by_worker,
    intent_state,
    on_new_connection,
    plant_interrupted_create,
    until_each_answers,
    wait_gone,
    workers_of,
)
from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]


def _serve(env: InitEnv, log: Path, workers: int, *, verbose: bool = False) -> ServerProcess:
    """`hsmbridge serve`; `verbose` (-v) makes the log show INFO records (logins, recovery)."""
    argv = [sys.executable, "-m", "hsmbridge", *(["-v"] if verbose else [])]
    argv += ["serve", "--config", str(env.config), "--workers", str(workers)]
    return ServerProcess(argv, log).wait_ready()


def _sigterm(srv: ServerProcess, timeout: float = 30.0) -> int:
    os.kill(srv.pid, signal.SIGTERM)  # the supervisor only: it must stop its workers itself
    return srv.proc.wait(timeout=timeout)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_single_process_flushes_audit_and_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=1)
    try:
        ids = calls(env, srv.url, 3)
        # Well inside the sink's 1 s flush interval: these events are still in the buffer.
        os.kill(srv.pid, signum)
        code = srv.proc.wait(timeout=30)
    finally:
        srv.kill()
    assert code == 0, srv.log_path.read_text()
    logged = {e["requestId"] for e in audit_events(env)}
    assert ids <= logged, f"missing audit events: {sorted(ids - logged)}"


def test_workers_serve_recover_once_in_the_supervisor_and_stop_cleanly(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    # A CreateKey a crash interrupted: start-up recovery must roll it back (row and material).
    interrupted = plant_interrupted_create(env)
    assert intent_state(env, interrupted) == (KeyLifecycle.CREATING, 1)
    log = tmp_path / "server.log"
    srv = _serve(env, log, workers=2, verbose=True)
    try:
        children = workers_of(srv.pid, 2)
        assert len(children) == 2, srv.log()
        ids = calls(env, srv.url, 20)
        # The second worker may first be reached by this CreateKey and log in while serving it.
        key_id, created = create_key(env, srv.url)
        served = encrypts_by_worker(env, srv, children, key_id)
        ids |= {created} | {a.headers["x-amzn-requestid"] for v in served.values() for a in v}
        code = _sigterm(srv)
        alive = wait_gone(children, 10)
    finally:
        srv.kill()
    assert code == 0, log.read_text()
    assert not alive, f"workers outlived the supervisor: {alive}"
    logged = {e["requestId"] for e in audit_events(env)}
    assert ids <= logged, f"missing audit events: {sorted(ids - logged)}"

    server_log = ServerLog(log)
    banner = server_log.banner  # printed by the supervisor after recovery, before any worker
    # Recovery ran: the interrupted CreateKey is gone from the metadata and from the token.
    assert intent_state(env, interrupted) == (None, 0)
    env.check().assert_clean("after serving with workers")
    # It ran once, in the supervisor, before any worker existed.
    rolled_back = server_log.records("recovery: rolled back interrupted CreateKey")
    assert [(r.message.rsplit(" ", 1)[1], r.index < banner) for r in rolled_back] == [
        (interrupted.key_id, True)
    ], server_log.lines
    # Logins: the supervisor's (for recovery, outside any request), then exactly one per worker
    # (both served), each made while serving one of our requests: no worker did start-up work
    # on the token, and none logged in twice.
    logins = server_log.records("logged in to cluster")
    assert [r.request_id for r in logins if r.index < banner] == ["-"], server_log.lines
    worker_logins = [r.request_id for r in logins if r.index > banner]
    assert len(worker_logins) == len(set(worker_logins)) == 2, server_log.lines
    assert set(worker_logins) <= ids, server_log.lines


def _requests_total(scrape: Answer, operation: str) -> float:
    for family in text_string_to_metric_families(scrape.body.decode()):
        for sample in family.samples:
            if sample.name == "hsmbridge_requests_total" and sample.labels == {
                "operation": operation,
                "outcome": "ok",
            }:
                return sample.value
    return 0.0


def test_metrics_and_health_describe_the_worker_that_answered(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=2)
    try:
        workers = workers_of(srv.pid, 2)
        assert len(workers) == 2, srv.log()
        served = encrypts_by_worker(env, srv, workers, create_key(env, srv.url)[0])
        # /metrics, unsigned: each worker counts exactly the Encrypts it served, not the total.
        scrapes = until_each_answers(
            lambda: on_new_connection(srv.port, [srv.pid, *workers], "GET", "/metrics"), workers
        )
        assert {pid: _requests_total(a[0], "Encrypt") for pid, a in scrapes.items()} == {
            pid: len(answers) for pid, answers in served.items()
        }
        # /health: each worker makes its own HSM round trip and caches its own result.
        checks = until_each_answers(
            lambda: on_new_connection(srv.port, [srv.pid, *workers], "GET", "/health"),
            workers,
            times=2,
        )
        assert _sigterm(srv) == 0
    finally:
        srv.kill()
    for pid, answers in checks.items():
        first, second = (a.json() for a in answers[:2])
        assert [a.status for a in answers] == [200] * len(answers), (pid, first)
        assert first["stores"][env.store_id]["status"] == "ACTIVE", (pid, first)
        assert first["cached"] is False, f"worker {pid} answered another process's check"
        assert (second["cached"], second["checkedAt"]) == (True, first["checkedAt"]), pid


def test_a_worker_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=2)
    try:
        children = workers_of(srv.pid, 2)
        assert len(children) == 2, srv.log()
        os.kill(srv.pid, signal.SIGKILL)  # no chance to stop them: PR_SET_PDEATHSIG must
        alive = wait_gone(children, 15)
    finally:
        srv.kill()
    assert not alive


def _replacement(srv: ServerProcess, survivor: int, dead: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = set(workers_of(srv.pid, 0))
        if len(pids) == 2 and dead not in pids and survivor in pids:
            return (pids - {survivor}).pop()
        time.sleep(0.2)
    pytest.fail(f"no replacement worker:\n{srv.log()}")


def test_a_crashed_worker_is_replaced_and_the_replacement_does_not_recover(
    tmp_path: Path,
) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=2)
    try:
        first, second = workers_of(srv.pid, 2)
        # Looks like a CreateKey the other worker is running: recovery (grace 0) in a starting
        # worker would roll it back under that worker's feet.
        in_flight = plant_interrupted_create(env)
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(srv, second, first)
        # The replacement answers: its app factory (where recovery would run) has returned.
        until_each_answers(
            lambda: on_new_connection(srv.port, [second, replacement], "GET", "/metrics"),
            [replacement],
        )
        assert calls(env, srv.url, 2)
        assert intent_state(env, in_flight) == (KeyLifecycle.CREATING, 1)
        assert _sigterm(srv) == 0
    finally:
        srv.kill()


def test_a_worker_that_cannot_start_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    log = tmp_path / "server.log"
    srv = _serve(env, log, workers=2)
    try:
        first, second = workers_of(srv.pid, 2)
        # An operator's broken edit: the running workers loaded the configuration already; a
        # worker started now reads it and cannot start.
        env.config.write_text(env.config.read_text() + "\n[service\n")
        os.kill(first, signal.SIGKILL)  # uvicorn's supervisor starts a replacement
        code = srv.proc.wait(timeout=60)
        alive = wait_gone([second], 10)
    finally:
        srv.kill()
    text = log.read_text()
    assert code == 1, text
    assert "could not start" in text
    assert "a worker could not start" in text
    assert not alive, f"a worker outlived the supervisor: {alive}"


def test_a_disconnect_through_one_worker_closes_the_other_logins(tmp_path: Path) -> None:
    """Each worker holds its own kmsuser login; the worker that serves DisconnectCustomKeyStore
    closes its own, and the login watch of every other process closes theirs within its
    interval (2 s), with no request touching the store there."""
    env = init_env(tmp_path / "env")
    log = tmp_path / "server.log"
    srv = _serve(env, log, workers=2, verbose=True)
    try:
        workers = workers_of(srv.pid, 2)
        assert len(workers) == 2, srv.log()
        encrypts_by_worker(env, srv, workers, create_key(env, srv.url)[0])  # both log in
        env.client(srv.url, attempts=3).disconnect_custom_key_store(CustomKeyStoreId=env.store_id)
        disconnected = time.monotonic()
        closing = f"closed the HSM login of custom key store {env.store_id}: it is DISCONNECTED"
        while not ServerLog(log).records(closing) and time.monotonic() - disconnected < 10:
            time.sleep(0.1)
        waited = time.monotonic() - disconnected
        assert _sigterm(srv) == 0
    finally:
        srv.kill()
    closed = ServerLog(log).records(closing)
    assert closed, ServerLog(log).lines
    assert waited < 2.0 + 3.0, waited  # one interval, plus a busy machine's scheduling
    assert all(r.request_id == "-" for r in closed)  # the watch, outside any request
