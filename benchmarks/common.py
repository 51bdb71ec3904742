"""Shared plumbing: statistics, load-average checks, subprocesses in their own process groups,
free loopback ports, hsmbridge environments and the machine description."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
LOOPBACK = "127.0.0.1"  # every server and every request stays on loopback (workplace rule)
BUSY_LOAD = 1.0  # 1-minute load above this on 2 cores means another job competes with us


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def check_load(phase: str) -> list[float]:
    """Record the load before a phase and warn when the machine is busy (numbers are noisy)."""
    load = loadavg()
    if load[0] > BUSY_LOAD:
        log(f"WARNING: 1-min load {load[0]} > {BUSY_LOAD} before {phase}: results will be noisy")
    return load


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100.0 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    """ops/s over the wall time and latency percentiles in milliseconds."""
    lat = sorted(latencies_s)
    return {
        "ops": len(lat),
        "seconds": round(wall_s, 4),
        "ops_per_s": round(len(lat) / wall_s, 1) if wall_s > 0 else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1000, 4),
        "p99_ms": round(percentile(lat, 99) * 1000, 4),
        "mean_ms": round(sum(lat) / len(lat) * 1000, 4) if lat else 0.0,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A child in its own process group, so stopping it also stops whatever it forked."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Proc:
    fh = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,  # own process group: killpg reaches its children too
        )
    finally:
        fh.close()
    return Proc(name, popen, log_path)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def run_grouped(argv: list[str], err: Any, timeout: float, what: str) -> bytes:
    """Run a child in its own process group with stdout captured; kill the whole group if it
    overruns `timeout` or fails; RuntimeError (naming `what`) unless it exits 0."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{what} timed out after {timeout} s") from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {out[-500:]!r}")
    return bytes(out)


def run_json(argv: list[str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run a worker subprocess that prints one JSON document as its last stdout line."""
    with log_path.open("ab") as err:
        out = run_grouped(argv, err, timeout, f"{argv[2:4]} (log {log_path})")
    lines = [line for line in out.decode().splitlines() if line.strip()]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- hsmbridge environments --------------------------------------------------------------------


@dataclass(frozen=True)
class HsmEnv:
    """A directory made by `hsmbridge init`: its own SoftHSM token, store and credentials."""

    root: Path
    port: int

    @property
    def config(self) -> Path:
        return self.root / "hsmbridge.toml"

    def credentials(self) -> tuple[str, str]:
        fields = dict(
            line.split(" = ", 1)
            for line in (self.root / "credentials").read_text().splitlines()
            if " = " in line
        )
        return fields["aws_access_key_id"], fields["aws_secret_access_key"]


def make_env(root: Path, log_path: Path) -> HsmEnv:
    port = free_port()
    with log_path.open("ab") as fh:
        subprocess.run(
            [PY, "-m", "hsmbridge", "init", "--data-dir", str(root), "--port", str(port)],
            check=True, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, timeout=120,
        )  # fmt: skip
    return HsmEnv(root, port)


# --- machine description -----------------------------------------------------------------------


def _first(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    versions: dict[str, str] = {}
    for dist in ("python-pkcs11", "uvicorn", "botocore", "moto", "hsmbridge"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "softhsm": _first(["softhsm2-util", "--version"]),
        "packages": versions,
        "git_commit": _first(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }
