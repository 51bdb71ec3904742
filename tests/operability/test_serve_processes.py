"""`python -m hsmbridge serve` as a subprocess: SIGTERM ends it cleanly, with one or N workers.

Over an environment made by `python -m hsmbridge init --data-dir D` (its own SoftHSM token):
a few boto3 calls, SIGTERM to the server's process only, then the exit code must be 0 and every
call's audit event must be in D/audit.jsonl (the audit buffer is flushed at shutdown, not lost
with the process). With workers: every line of the one audit file that several processes append
to parses, no worker outlives the supervisor (SIGTERM or SIGKILL), and a killed worker is
replaced by uvicorn's supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = pytest.mark.softhsm


def _serve(env: InitEnv, log: Path, workers: int) -> ServerProcess:
    argv = [sys.executable, "-m", "hsmbridge", "serve", "--config", str(env.config)]
    return ServerProcess([*argv, "--workers", str(workers)], log).wait_ready()


def _calls(env: InitEnv, url: str, n: int) -> set[str]:
    """CreateKey, then n Encrypt/Decrypt pairs; returns every response's request id."""
    kms = env.client(url, attempts=3)
    ids: set[str] = set()
    created = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
    ids.add(created["ResponseMetadata"]["RequestId"])
    key_id = created["KeyMetadata"]["KeyId"]
    for i in range(n):
        # A new connection per call (botocore pools them): lets the kernel pick other workers.
        kms = env.client(url, attempts=3) if i % 5 == 0 else kms
        sealed = kms.encrypt(KeyId=key_id, Plaintext=f"secret {i}".encode())
        opened = kms.decrypt(CiphertextBlob=sealed["CiphertextBlob"])
        assert opened["Plaintext"] == f"secret {i}".encode()
        ids |= {sealed["ResponseMetadata"]["RequestId"], opened["ResponseMetadata"]["RequestId"]}
    return ids


def _sigterm(srv: ServerProcess, timeout: float = 30.0) -> int:
    os.kill(srv.pid, signal.SIGTERM)  # the supervisor only: it must stop its workers itself
    return srv.proc.wait(timeout=timeout)


def _audit(env: InitEnv) -> list[dict[str, object]]:
    lines = (env.root / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # a torn or interleaved line fails here


def test_sigterm_single_process_flushes_audit_and_exits_0(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=1)
    try:
        ids = _calls(env, srv.url, 3)
        # Well inside the sink's 1 s flush interval: these events are still in the buffer.
        code = _sigterm(srv)
    finally:
        srv.kill()
    assert code == 0, srv.log_path.read_text()
    logged = {e["requestId"] for e in _audit(env)}
    assert ids <= logged, f"missing audit events: {sorted(ids - logged)}"


def test_workers_serve_recover_once_and_stop_cleanly(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    log = tmp_path / "server.log"
    srv = _serve(env, log, workers=2)
    try:
        children = _workers_of(srv.pid, 2)
        assert len(children) == 2, srv.log()
        ids = _calls(env, srv.url, 20)
        code = _sigterm(srv)
        alive = _wait_gone(children, 10)
    finally:
        srv.kill()
    assert code == 0, log.read_text()
    assert not alive, f"workers outlived the supervisor: {alive}"
    logged = {e["requestId"] for e in _audit(env)}
    assert ids <= logged, f"missing audit events: {sorted(ids - logged)}"


def test_a_worker_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=2)
    try:
        children = _workers_of(srv.pid, 2)
        assert len(children) == 2, srv.log()
        os.kill(srv.pid, signal.SIGKILL)  # no chance to stop them: PR_SET_PDEATHSIG must
        alive = _wait_gone(children, 15)
    finally:
        srv.kill()
    assert not alive


def test_a_crashed_worker_is_replaced(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    srv = _serve(env, tmp_path / "server.log", workers=2)
    try:
        first, _ = _workers_of(srv.pid, 2)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = set(_workers_of(srv.pid, 0))
            if len(pids) == 2 and first not in pids:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no replacement worker:\n{srv.log()}")
        assert _calls(env, srv.url, 2)
        assert _sigterm(srv) == 0
    finally:
        srv.kill()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _workers_of(pid: int, expect: int) -> list[int]:
    """The supervisor's worker pids (multiprocessing spawn children), once `expect` run."""
    deadline = time.monotonic() + 30
    while True:
        kids = [k for k in _children(pid) if "spawn_main" in _cmdline(k)]
        if len(kids) >= expect or time.monotonic() > deadline:
            return kids
        time.sleep(0.1)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Pids still running (not zombies) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
