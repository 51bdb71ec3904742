"""How `hsmbridge serve` picks its worker count and log format, run as an operator runs it.

* `workers = N` under `[service]` in hsmbridge.toml, with no `--workers`: N worker processes.
* Neither: one worker per CPU the process may run on (its affinity), at most 8.
* `--log-format json`: every log line of the supervisor and of every worker is one JSON object,
  and records written while serving a request carry that request's id.
* Ctrl-C (SIGINT to the whole foreground process group) stops a multi-worker server cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from hsmbridge.http import workers as workers_module
from tests.operability.processes import (
    BANNER,
    audit_events,
    calls,
    children,
    cmdline,
    create_key,
    encrypts_by_worker,
    wait_gone,
    workers_of,
)
from tests.reliability.servers import InitEnv, ServerProcess, init_env


def _serve(env: InitEnv, log: Path, *args: str, prefix: tuple[str, ...] = ()) -> ServerProcess:
    argv = [*prefix, sys.executable, "-m", "hsmbridge", "serve", "--config", str(env.config)]
    return ServerProcess([*argv, *args], log).wait_ready()


def _banner(log: Path) -> str:
    [line] = [x for x in log.read_text().splitlines() if x.startswith(BANNER)]
    return line


def _spawned(pid: int) -> list[int]:
    return [k for k in children(pid) if "spawn_main" in cmdline(k)]


@pytest.mark.softhsm
@pytest.mark.slow
def test_workers_from_the_configuration_and_ctrl_c(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    text = env.config.read_text()
    assert "\n[service]\n" in text
    env.config.write_text(text.replace("\n[service]\n", "\n[service]\nworkers = 3\n", 1))
    log = tmp_path / "server.log"
    srv = _serve(env, log)  # no --workers
    try:
        started = workers_of(srv.pid, 3)
        assert len(started) == 3, srv.log()
        ids = calls(env, srv.url, 5)
        os.killpg(srv.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        code = srv.proc.wait(timeout=30)
        alive = wait_gone(started, 10)
    finally:
        srv.kill()
    assert code == 0, log.read_text()
    assert not alive, f"workers outlived the supervisor: {alive}"
    assert _banner(log).endswith(", 3 worker processes)")
    logged = {e["requestId"] for e in audit_events(env)}
    assert ids <= logged, f"missing audit events: {sorted(ids - logged)}"


@pytest.mark.softhsm
@pytest.mark.slow
@pytest.mark.parametrize("cpus", [1, 2])
def test_default_is_one_worker_per_cpu_of_the_affinity(tmp_path: Path, cpus: int) -> None:
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.fail("taskset (util-linux) is missing: apt-get install util-linux")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < cpus:
        pytest.skip(f"this test process may run on {len(allowed)} CPU(s) only")
    env = init_env(tmp_path / "env")
    log = tmp_path / "server.log"
    cpu_list = ",".join(str(c) for c in allowed[:cpus])
    srv = _serve(env, log, prefix=(taskset, "--cpu-list", cpu_list))  # taskset execs serve
    try:
        if cpus > 1:
            assert len(workers_of(srv.pid, cpus)) == cpus, srv.log()
        assert calls(env, srv.url, 1)
        spawned = _spawned(srv.pid)
        os.kill(srv.pid, signal.SIGTERM)
        code = srv.proc.wait(timeout=30)
    finally:
        srv.kill()
    assert code == 0, log.read_text()
    expected = "1 process" if cpus == 1 else f"{cpus} worker processes"
    assert _banner(log).endswith(f", {expected})")
    assert len(spawned) == (0 if cpus == 1 else cpus)


def test_default_worker_count_is_capped_at_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """No machine here has more than 8 CPUs, so the affinity is what is substituted."""
    for cpus, expected in ((1, 1), (3, 3), (8, 8), (9, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert workers_module.default_workers() == expected


@pytest.mark.softhsm
@pytest.mark.slow
def test_log_format_json_through_the_cli_in_supervisor_and_workers(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "hsmbridge", "-v", "serve", "--config", str(env.config)]
    srv = ServerProcess([*argv, "--log-format", "json", "--workers", "2"], log).wait_ready()
    try:
        started = workers_of(srv.pid, 2)
        assert len(started) == 2, srv.log()
        key_id, created = create_key(env, srv.url)
        served = encrypts_by_worker(env, srv, started, key_id)
        assert srv.proc.poll() is None
        os.kill(srv.pid, signal.SIGTERM)
        code = srv.proc.wait(timeout=30)
    finally:
        srv.kill()
    assert code == 0, log.read_text()
    lines = log.read_text().splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith(BANNER))
    # The banner is printed, not logged: its first line and the indented lines after it.
    end = next(i for i in range(banner + 1, len(lines)) if not lines[i].startswith("  "))
    records = [json.loads(line) for line in lines[:banner] + lines[end:]]  # each line parses
    for record in records:
        assert {"time", "level", "logger", "message", "requestId", "thread"} <= set(record)
    # Both workers log JSON too: uvicorn's start-up record of each, and each worker's login,
    # made while serving one of our Encrypts, carries that request's id.
    started_records = {r["message"] for r in records if r["logger"] == "uvicorn.error"}
    assert {f"Started server process [{pid}]" for pid in started} <= started_records
    ids = {a.headers["x-amzn-requestid"] for answers in served.values() for a in answers}
    logins = [r["requestId"] for r in records if r["message"].startswith("logged in to cluster")]
    assert len(logins) == len(set(logins)) == 2, records
    assert set(logins) <= ids | {created}, records
