"""Fixtures for the CloudHSM stand-in: environments whose cluster is reached through it with the
`cloudhsm` profile, in this process, on tokens of the run's SoftHSM2 stock.

The stand-in reads its settings once, when this process first initialises it, so every
environment here shares one settings file (the run's own when HSMBRIDGE_TEST_HSM=cloudhsm-shim
made one); tokens are never shared, so neither is any state the stand-in keeps per cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from hsmbridge.config import ClusterBinding
from tests.cloudhsm_shim import shim_conf, shim_profile
from tests.conftest import SoftHsmEnv
from tests.harness import KmsEnv

CONF_ENV = "HSMBRIDGE_SHIM_CONF"


@pytest.fixture(scope="session")
def shim_state(softhsm_env: SoftHsmEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of the stand-in as this process loads it."""
    if CONF_ENV not in os.environ:
        os.environ[CONF_ENV] = str(shim_conf(tmp_path_factory.mktemp("cloudhsm-shim")))
    return Path(os.environ[CONF_ENV]).parent / "state"


@pytest.fixture
def softhsm_token(
    softhsm_token: Callable[..., tuple[ClusterBinding, str]], shim_state: Path
) -> Callable[..., tuple[ClusterBinding, str]]:
    """The run's token factory, with every binding behind the stand-in (`cloudhsm` profile)."""
    profile = shim_profile()

    def make() -> tuple[ClusterBinding, str]:
        stock, password = softhsm_token()
        shimmed = replace(profile, token_label=stock.profile.token_label)
        return replace(stock, profile=shimmed), password

    return make


@pytest.fixture
def make_cloudhsm_env(make_kms_env: Callable[..., KmsEnv]) -> Callable[..., KmsEnv]:
    """Factory: an environment on a fresh token behind the stand-in (`cloudhsm` profile); with
    `store=True` (default) a custom key store is created and connected (`make_kms_env` over the
    token factory above)."""
    return make_kms_env
