"""Real hsmbridge servers in subprocesses, over environments made by `hsmbridge init`.

`InitEnv` is one `python -m hsmbridge init --data-dir D` environment: its own SoftHSM2 token
directory (D/tokens), separate from the pytest process's SoftHSM, which therefore never loads it.
`ServerProcess` runs either `python -m hsmbridge serve` or the test launcher `crash_server.py` in
its own process group on a loopback port reserved for it (`reserve_port`), so teardown can
always SIGKILL the whole group; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import urllib3
from botocore.config import Config

from hsmbridge import bootstrap
from hsmbridge.config import load_settings
from tests.cloudhsm_shim import run_hsm
from tests.reliability import consistency

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).resolve().parent / "crash_server.py"
READY_TIMEOUT_S = 30.0
_HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1.0, read=10.0))


def reserve_port() -> socket.socket:
    """A free loopback port, held until the server process listens on it.

    Binding port 0, closing and passing the number on leaves a window in which anyone on the
    machine may take the port. Instead the socket stays bound (never listening) with
    SO_REUSEADDR: Linux then skips the port for every other bind to port 0 and every outgoing
    connection, while the server, which also sets SO_REUSEADDR (asyncio's create_server and
    uvicorn's bind_socket do), may still bind and listen on it. Close it once the server listens.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class InitEnv:
    root: Path
    config: Path
    store_id: str
    token_label: str
    password: str
    access_key: str
    secret_key: str

    @property
    def softhsm_conf(self) -> Path:
        return self.root / "softhsm2.conf"

    def token_dirs(self) -> list[Path]:
        return [p for p in (self.root / "tokens").iterdir() if p.is_dir()]

    def client(self, url: str, *, attempts: int = 1, read_timeout: float = 30.0) -> Any:
        return boto3.client(
            "kms",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=2,
                read_timeout=read_timeout,
            ),
        )

    def check(self) -> consistency.Report:
        """Label audit of the (quiescent) store: pkcs11-tool for the HSM, SQLite for metadata."""
        labels = consistency.labels_via_pkcs11_tool(
            self.softhsm_conf, self.token_label, self.password
        )
        rows, tombs = consistency.read_metadata(load_settings(self.config), self.store_id)
        return consistency.check(labels, rows, tombs)

    def production_audit(self) -> dict[str, Any]:
        """`hsmbridge audit` (the operators' key-label audit) on the store; run it with the
        server stopped. Returns its JSON report; a non-zero exit is a failed assertion."""
        argv = [sys.executable, "-m", "hsmbridge", "audit", "--config", str(self.config)]
        argv += ["--keystore", self.store_id, "--output", "json"]
        done = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert done.returncode == 0, done.stdout + done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report


def init_env(root: Path, metadata_url: str | None = None, hsm: str | None = None) -> InitEnv:
    """`hsmbridge init --data-dir root`; with `metadata_url` (postgresql://...) the metadata
    lives in that database (`--metadata-url`), so several servers may share the environment.
    `hsm` is init's `--hsm` (default: the run's, HSMBRIDGE_TEST_HSM)."""
    argv = [sys.executable, "-m", "hsmbridge", "init", "--data-dir", str(root)]
    argv += ["--hsm", hsm or run_hsm()]
    if metadata_url is not None:
        argv += ["--metadata-url", metadata_url]
    subprocess.run(
        argv,
        check=True,
        capture_output=True,
        timeout=120,
        cwd=REPO,
    )
    config = root / "hsmbridge.toml"
    doc = tomllib.loads(config.read_text())
    creds = dict(
        line.split(" = ", 1)
        for line in (root / "credentials").read_text().splitlines()
        if " = " in line
    )
    meta = bootstrap.open_metadata_store(load_settings(config))
    try:
        (store,) = meta.list_key_stores(10, None)
    finally:
        meta.close()
    return InitEnv(
        root=root,
        config=config,
        store_id=store.store.store_id,
        # The CloudHSM stand-in shows one slot, the cluster's, so no token label is configured:
        # the token is labelled with the cluster id.
        token_label=doc["clusters"][0].get("token_label", doc["clusters"][0]["cluster_id"]),
        password=(root / "kmsuser.password").read_text().strip(),
        access_key=creds["aws_access_key_id"],
        secret_key=creds["aws_secret_access_key"],
    )


class ServerProcess:
    """One server process in its own session (process group); `kill()` is SIGKILL to the group."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self._reservation: socket.socket | None = reserve_port()
        self.port = int(self._reservation.getsockname()[1])
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def serve(cls, env: InitEnv, log_path: Path, *args: str) -> ServerProcess:
        """Exactly what an operator runs (`args`: more options, e.g. "--workers", "1")."""
        argv = [sys.executable, "-m", "hsmbridge", "serve", "--config", str(env.config), *args]
        return cls(argv, log_path)

    @classmethod
    def launcher(cls, env: InitEnv, log_path: Path, *args: str) -> ServerProcess:
        """The production server under the test launcher (kill points, fast clock, stats)."""
        argv = [sys.executable, str(LAUNCHER), "--config", str(env.config), *args]
        return cls(argv, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> tuple[int, Any]:
        resp = _HTTP.request("GET", self.url + "/health")
        return resp.status, resp.json() if resp.data else None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    self._release_port()  # the server listens: the port is its own now
                    return self
            except OSError:
                time.sleep(0.03)
        self.kill()
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log()}")

    def _release_port(self) -> None:
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def kill(self) -> None:
        """SIGKILL the process group; idempotent."""
        self._release_port()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        finally:
            self._log.close()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit in time; returns the code."""
        self._release_port()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"server ignored SIGTERM:\n{self.log()}") from None
        self._log.close()
        return int(self.proc.returncode)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]
