"""Fixtures for the end-to-end tests: the real server (`create_app` + `ThreadedServer`) over a
real SoftHSM token, boto3 clients pointed at it, and the session-wide wire observations.

Two servers are on offer:
* `shared` (session scope): one token for most tests, each test making its own keys. SoftHSM
  tokens are provisioned up front (tests/conftest.py, 64 for the whole run, shared with every
  other suite), so a server per test would exhaust them.
* `fresh` (per test, from `make_kms_env(store=False)`): for tests that disconnect the store,
  delete it or move the clock, which would disturb other tests on a shared server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from hsmbridge.config import ClusterBinding
from tests.conftest import SoftHsmEnv
from tests.e2e.e2e_support import E2e, Observations, kms_client, start_e2e
from tests.harness import KmsEnv, build_env

CONTRACT_MODULE = "test_e2e_contract.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The contract test checks what every other e2e test observed, so it must run after them.
    contract = [item for item in items if item.path.name == CONTRACT_MODULE]
    if contract:
        items[:] = [item for item in items if item.path.name != CONTRACT_MODULE] + contract


@pytest.fixture(scope="session")
def observations() -> Observations:
    return Observations()


@pytest.fixture(scope="session")
def shared(
    softhsm_env: SoftHsmEnv,
    tmp_path_factory: pytest.TempPathFactory,
    observations: Observations,
) -> Iterator[E2e]:
    # make_kms_env(store=False) at session scope: the same token hand-out as `softhsm_token`.
    if not softhsm_env.stock:
        pytest.fail("SoftHSM token stock exhausted: raise HSMBRIDGE_TEST_TOKENS")
    label, pin = softhsm_env.stock.pop(0)
    softhsm_env.used[label] = pin
    binding = ClusterBinding("unused", replace(softhsm_env.profile, token_label=label))
    env = build_env(tmp_path_factory.mktemp("e2e-shared"), binding, pin)
    e2e = start_e2e(env, observations, "SharedE2eStore")
    yield e2e
    e2e.close()


@pytest.fixture
def fresh(make_kms_env: Callable[..., KmsEnv], observations: Observations) -> Iterator[E2e]:
    """A server of its own, with a connected store made through boto3."""
    e2e = start_e2e(make_kms_env(store=False), observations)
    yield e2e
    e2e.close()


@pytest.fixture
def kms(shared: E2e) -> Any:
    return shared.kms


@pytest.fixture
def lax(shared: E2e, observations: Observations) -> Any:
    """A client without botocore's parameter validation, so the server's checks answer."""
    return kms_client(shared.url, observations, validate=False)


@pytest.fixture
def key(shared: E2e) -> dict[str, Any]:
    """A new Enabled key in the shared store (its KeyMetadata)."""
    return shared.create_key()
