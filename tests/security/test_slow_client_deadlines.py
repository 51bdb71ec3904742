"""The production slow-client deadlines: `hsmbridge serve` cuts off a client after 10 s.

tests/security/test_limits.py shows the cut-offs work, with both deadlines lowered to 0.5 s. This
pins the values `serve` actually runs with, without waiting 10 s: the CLI runs in this process
over a real environment, and at the point where it would hand its configuration to uvicorn the
configuration is taken instead (for one process: `_Server.run`; for workers: uvicorn's
`Multiprocess` supervisor). The app each worker builds comes from the real worker factory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

from hsmbridge.http import server, workers
from hsmbridge.http.app import KmsApi
from hsmbridge.main import main
from tests.harness import KmsEnv

pytestmark = pytest.mark.softhsm

DEADLINE_S = 10.0  # README: "slow or stalled clients are cut off after 10 s"


@pytest.fixture
def quiet_root_logger() -> Iterator[None]:
    """`serve` installs its own log handler on the root logger; put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def env(make_kms_env: Callable[..., KmsEnv], monkeypatch: pytest.MonkeyPatch) -> KmsEnv:
    env = make_kms_env()
    env.close()  # one service per files at a time: `serve` opens its own
    # `serve` with workers exports these for its workers; monkeypatch removes them afterwards.
    for name in (workers.ENV_CONFIG, workers.ENV_LOG_FORMAT, workers.ENV_LOG_LEVEL):
        monkeypatch.setenv(name, "unset")
    monkeypatch.setenv(workers.ENV_SUPERVISOR, "0")
    return env


def _assert_header_deadline(config: uvicorn.Config) -> None:
    assert isinstance(config.http, type)
    assert issubclass(config.http, server._HeaderDeadline)
    assert config.http.header_timeout_s == DEADLINE_S


def _body_deadline(app: KmsApi) -> float:
    return float(app._body_timeout)


@pytest.mark.usefixtures("quiet_root_logger")
def test_serve_in_one_process_cuts_slow_clients_after_10_s(
    env: KmsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[uvicorn.Config] = []
    monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: taken.append(self.config))
    argv = ["serve", "--config", str(env.config_path), "--workers", "1", "--port", "0"]
    assert main(argv) == 0
    [config] = taken
    _assert_header_deadline(config)
    assert isinstance(config.app, KmsApi)
    assert _body_deadline(config.app) == DEADLINE_S


@pytest.mark.usefixtures("quiet_root_logger")
def test_serve_with_workers_cuts_slow_clients_after_10_s(
    env: KmsEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[uvicorn.Config] = []

    class Supervisor:
        """Stands in for uvicorn's Multiprocess: records the configuration, starts no worker."""

        def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
            taken.append(config)
            self.processes: list[Any] = []

        def run(self) -> None:
            return None

    monkeypatch.setattr(server, "Multiprocess", Supervisor)
    argv = ["serve", "--config", str(env.config_path), "--workers", "2", "--port", "0"]
    assert main(argv) == 0
    [config] = taken
    _assert_header_deadline(config)
    assert (config.app, config.workers) == (workers.FACTORY, 2)
    # What a worker runs: the factory, with the environment the supervisor exported.
    monkeypatch.setenv(workers.ENV_SUPERVISOR, "0")  # this process has no supervisor
    app = workers.app_from_env()
    try:
        assert _body_deadline(app) == DEADLINE_S
    finally:
        assert app.on_shutdown is not None
        app.on_shutdown()
