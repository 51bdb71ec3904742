"""Fixtures for the CloudHSM stand-in: environments whose cluster is reached through it with the
`cloudhsm` profile, in this process, on tokens of the run's SoftHSM2 stock.

The stand-in reads its settings once, when this process first initialises it, so every
environment here shares one settings file (the run's own when HSMBRIDGE_TEST_HSM=cloudhsm-shim
made one); tokens are never shared, so neither is any state the stand-in keeps per cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hsmbridge.config import ClusterBinding
from tests.cloudhsm_shim import shim_conf, shim_profile
from tests.conftest import SoftHsmEnv, _opened
from tests.harness import KmsEnv, build_env

CONF_ENV = "HSMBRIDGE_SHIM_CONF"


@pytest.fixture(scope="session")
def shim_state(softhsm_env: SoftHsmEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of the stand-in as this process loads it."""
    if CONF_ENV not in os.environ:
        os.environ[CONF_ENV] = str(shim_conf(tmp_path_factory.mktemp("cloudhsm-shim")))
    return Path(os.environ[CONF_ENV]).parent / "state"


@pytest.fixture
def make_cloudhsm_env(
    softhsm_token: Callable[..., tuple[ClusterBinding, str]],
    shim_state: Path,
    tmp_path: Path,
) -> Iterator[Callable[..., KmsEnv]]:
    """Factory: an environment on a fresh token behind the stand-in (`cloudhsm` profile); with
    `store=True` (default) a custom key store is created and connected."""
    made: list[KmsEnv] = []
    profile = shim_profile()

    def make(store: bool = True, name: str = "CloudHsmStore") -> KmsEnv:
        stock, password = softhsm_token()
        binding = replace(stock, profile=replace(profile, token_label=stock.profile.token_label))
        env = build_env(tmp_path / f"env{len(made)}", binding, password)
        made.append(env)
        return _opened(env, store, name)

    yield make
    for env in made:
        env.close()
