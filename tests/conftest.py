"""Shared fixtures: a real SoftHSM2 token directory for the whole run, and fresh tokens in it.

SoftHSM reads its token directory at C_Initialize, so tokens created after the library is loaded
are invisible until it is re-initialised (seen with Debian's 2.6.1). `softhsm_env` therefore
provisions a stock of tokens up front, before anything loads the module; `softhsm_token()` hands
them out one per call. Markers are registered in pyproject.toml, not here.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from hsmbridge.config import ClusterBinding, HsmProfile, load_profile
from tests.harness import KmsEnv, build_env
from tests.live import live, make_live  # noqa: F401 - fixtures shared by several suites

REPO = Path(__file__).resolve().parent.parent
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
INIT_TOKEN = REPO / "softhsm" / "init-token.sh"
SO_PIN = os.environ.get("HSMBRIDGE_TEST_SO_PIN", "so-pin-4321")
# One token per environment a test builds; the whole suite needs ~150 (about 0.09 s each). A run
# that needs more fails with "stock exhausted", never silently.
TOKEN_STOCK = int(os.environ.get("HSMBRIDGE_TEST_TOKENS", "224"))


@dataclass
class SoftHsmEnv:
    conf: Path
    profile: HsmProfile
    module: str = SOFTHSM_MODULE
    stock: list[tuple[str, str]] = field(default_factory=list)  # (label, user PIN)
    used: dict[str, str] = field(default_factory=dict)

    def init_token(self, label: str, user_pin: str) -> None:
        env = {**os.environ, "HSMBRIDGE_SO_PIN": SO_PIN, "HSMBRIDGE_USER_PIN": user_pin}
        subprocess.run(
            ["sh", str(INIT_TOKEN), str(self.conf), label],
            env=env,
            check=True,
            capture_output=True,
        )


@pytest.fixture(scope="session")
def softhsm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmEnv]:
    if not os.path.exists(SOFTHSM_MODULE):
        # STYLE practice 11: a missing SoftHSM is an error; deselect with -m "not softhsm".
        pytest.fail(f"SoftHSM2 module {SOFTHSM_MODULE} is missing: apt-get install softhsm2")
    base = tmp_path_factory.mktemp("softhsm")
    conf = base / "softhsm2.conf"
    tokens = base / "tokens"
    tokens.mkdir()
    template = (REPO / "softhsm" / "softhsm2.conf.in").read_text()
    conf.write_text(template.replace("@TOKENDIR@", str(tokens)))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # before any pkcs11.lib() of SoftHSM in this process
    env = SoftHsmEnv(conf=conf, profile=load_profile(REPO / "config" / "softhsm2.toml"))
    for i in range(TOKEN_STOCK):
        # Equal-length labels: pkcs11-tool --token-label matches a prefix, so "hsmb-test-10"
        # would also select "hsmb-test-100".
        label, pin = f"hsmb-test-{i:03d}", f"kmsuser-pass-{i:03d}"
        env.init_token(label, pin)
        env.stock.append((label, pin))
    yield env
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


_cluster_ids = itertools.count(1)


@pytest.fixture
def softhsm_token(
    softhsm_env: SoftHsmEnv,
) -> Callable[..., tuple[ClusterBinding, str]]:
    """Factory: a fresh, never-used SoftHSM token -> (ClusterBinding, kmsuser password)."""

    def make(label: str | None = None) -> tuple[ClusterBinding, str]:
        if label is not None:
            pytest.fail("named tokens are not supported: SoftHSM only sees pre-provisioned ones")
        if not softhsm_env.stock:
            pytest.fail("SoftHSM token stock exhausted: raise HSMBRIDGE_TEST_TOKENS")
        token_label, pin = softhsm_env.stock.pop(0)
        softhsm_env.used[token_label] = pin
        profile = replace(softhsm_env.profile, token_label=token_label)
        cluster_id = f"cluster-softhsm{next(_cluster_ids):04d}"
        return ClusterBinding(cluster_id, profile), pin

    return make


@pytest.fixture
def make_kms_env(
    softhsm_token: Callable[..., tuple[ClusterBinding, str]], tmp_path: Path
) -> Iterator[Callable[..., KmsEnv]]:
    """Factory: a fresh environment on its own token; with `store=True` (default) a custom key
    store is created and connected through the service."""
    made: list[KmsEnv] = []

    def make(store: bool = True, name: str = "TestKeyStore") -> KmsEnv:
        binding, password = softhsm_token()
        env = build_env(tmp_path / f"env{len(made)}", binding, password)
        made.append(env)
        service = env.open()
        if store:
            env.store_id = service.keystores.create(
                name, env.cluster_id, env.pki.ca_cert_pem, password
            )
            service.keystores.connect(env.store_id)
        return env

    yield make
    for env in made:
        env.close()


@pytest.fixture
def kms_env(make_kms_env: Callable[..., KmsEnv]) -> KmsEnv:
    """A connected custom key store on a fresh SoftHSM2 token, through a real KmsService."""
    return make_kms_env()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches a SoftHSM token through its fixtures is a `softhsm` test, marked
    or not, so `-m "not softhsm"` selects exactly the tests that run without one."""
    for item in items:
        if "softhsm_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.softhsm)
