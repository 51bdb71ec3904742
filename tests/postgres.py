"""A real PostgreSQL server for the tests: started once per session, one fresh database per test.

PostgreSQL refuses to run as root and CI runs as root, so `initdb`, `pg_ctl` and the server run as
the unprivileged `postgres` system user (created by Debian's package) through `runuser`, on a
scratch data directory of its own under /tmp (removed at the end), listening on 127.0.0.1 only (a
free port) with trust authentication. Test databases use an ICU (linguistic) collation: a text
column without `COLLATE "C"` would then page in another order than SQLite, and the contract tests
notice. A missing PostgreSQL is an error, not a skip: `bash softhsm/bootstrap.sh` installs it.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_USER = "postgres"  # the Debian package's system user, and the server's superuser
_names = itertools.count(1)


def pg_bin(tool: str) -> str:
    """The newest installed PostgreSQL's `tool`: Debian keeps it out of PATH; PATH's otherwise."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which(tool)
    if on_path is None:
        pytest.fail(
            f"PostgreSQL's {tool} is not installed (looked in /usr/lib/postgresql/*/bin and "
            "PATH): run `bash softhsm/bootstrap.sh test` or apt-get install postgresql; "
            'deselect with -m "not postgres"'
        )
    return on_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres() -> list[str]:
    if os.geteuid() != 0:  # already unprivileged: run the tools as ourselves
        return []
    return ["runuser", "-u", PG_USER, "--"]


class PostgresServer:
    """One PostgreSQL cluster in a scratch directory; `url(db)` is a libpq URL for database db."""

    def __init__(self, base: Path, *, durable: bool = False) -> None:
        # Tests run without fsync (nothing to lose); the benchmark runs durable, as SQLite's
        # synchronous=FULL is, or the engines' figures would not compare.
        self.durable = durable
        self.base = base
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.port = _free_port()
        self.log = base / "server.log"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*_as_postgres(), *argv], capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")

    def init(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.base, PG_USER)
            shutil.chown(self.sockets, PG_USER)
            # runuser needs to reach the scratch directory through its 0700 parents (mkdtemp's).
            for parent in self.base.parents:
                if parent == Path(parent.anchor) or parent.stat().st_mode & 0o001:
                    break
                parent.chmod(parent.stat().st_mode | 0o001)
        self._run(
            pg_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-k {self.sockets} -c listen_addresses=127.0.0.1 -p {self.port} -c max_connections=200"
        )
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-o",
            options,
            "start",
        )
        self._run_start_check()

    def _run_start_check(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server. "immediate" loses what fsync=off left unwritten: for the session's
        end; "fast" (every connection cut, data kept) for a test that starts it again."""
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "stop")

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"hsmb_test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(
                f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' "
                "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
            )
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_server(base: Path, *, durable: bool = False) -> tuple[PostgresServer, float]:
    """A running server in `base`, and how long initdb plus start took (seconds)."""
    began = time.perf_counter()
    server = PostgresServer(base, durable=durable)
    server.init()
    server.start()
    return server, time.perf_counter() - began


def fresh_database(server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on `server`, dropped afterwards."""
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, stopped (immediate mode) at the end.

    Its directory is not under pytest's base temporary directory: every pytest session that
    starts resets /tmp/pytest-of-USER to mode 0700, which locks the `postgres` user out of a
    data directory another running session keeps there (PANIC: pg_control: Permission denied).
    """
    base = Path(tempfile.mkdtemp(prefix="hsmbridge-test-postgres-"))
    try:
        server, _seconds = start_server(base / "server")
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server (dropped after the test)."""
    yield from fresh_database(postgres_server)
