"""Shared fixtures: a real SoftHSM2 token directory for the whole run, fresh tokens in it, and the
service environments built on them (`make_kms_env`) or on a fake HSM instead (`make_fake_env`).

SoftHSM reads its token directory at C_Initialize, so tokens created after the library is loaded
are invisible until it is re-initialised (seen with Debian's 2.6.1). `softhsm_env` therefore
provisions a stock of tokens up front, before anything loads the module; `softhsm_token()` hands
them out one per call. Tests of service logic use `make_fake_env`: the same files and SQLite
store, an in-memory token, no SoftHSM (so they are not `softhsm` tests). A PostgreSQL server for
the metadata tests comes from `tests.postgres` (`postgres_server`, `postgres_url`). Markers are
registered in pyproject.toml, not here.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from hsmbridge.config import ClusterBinding, HsmProfile, builtin_profile, load_profile
from tests.callers import ADMIN
from tests.cloudhsm_shim import run_hsm, shim_conf, shim_profile
from tests.fake_hsm import FakeHsm
from tests.harness import SOFTHSM2_PROFILE, KmsEnv, build_env
from tests.live import live, make_live  # noqa: F401 - fixtures shared by several suites
from tests.postgres import postgres_server, postgres_url  # noqa: F401 - shared fixtures

REPO = Path(__file__).resolve().parent.parent
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = os.environ.get("HSMBRIDGE_TEST_SO_PIN", "so-pin-4321")
# One token per environment a test builds. The whole suite used 208 (with the CloudHSM stand-in's
# tests); creation slows as the stock grows, so 225 leaves a margin. A run that needs more fails
# with "stock exhausted", never silently; the run summary prints how many were used.
TOKEN_STOCK = int(os.environ.get("HSMBRIDGE_TEST_TOKENS", "225"))


@dataclass
class SoftHsmEnv:
    conf: Path
    profile: HsmProfile
    module: str = SOFTHSM_MODULE
    stock: list[tuple[str, str]] = field(default_factory=list)  # (label, user PIN)
    used: dict[str, str] = field(default_factory=dict)

    def init_token(self, label: str, user_pin: str) -> None:
        """A new token (the label is never in use): softhsm2-util itself, without
        init-token.sh's look for an existing one, which lists every token so far (the stock's
        creation took O(n^2): ~40% of its time at 200 tokens)."""
        argv = ["softhsm2-util", "--init-token", "--free", "--label", label]
        subprocess.run(
            [*argv, "--so-pin", SO_PIN, "--pin", user_pin],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=True,
            capture_output=True,
        )


_SOFTHSM_ENV = pytest.StashKey[tuple[SoftHsmEnv, float]]()


@pytest.fixture(scope="session")
def softhsm_env(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[SoftHsmEnv]:
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
    env = SoftHsmEnv(conf=conf, profile=_run_profile(base))
    start = time.perf_counter()
    for i in range(TOKEN_STOCK):
        # Equal-length labels: pkcs11-tool --token-label matches a prefix, so "hsmb-test-10"
        # would also select "hsmb-test-100".
        label, pin = f"hsmb-test-{i:03d}", f"kmsuser-pass-{i:03d}"
        env.init_token(label, pin)
        env.stock.append((label, pin))
    pytestconfig.stash[_SOFTHSM_ENV] = (env, time.perf_counter() - start)
    yield env
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def _run_profile(base: Path) -> HsmProfile:
    """SoftHSM2 itself, or with HSMBRIDGE_TEST_HSM=cloudhsm-shim the `cloudhsm` profile through
    the CloudHSM stand-in over the same tokens."""
    if run_hsm() == "softhsm2":
        return load_profile(builtin_profile("softhsm2"))
    os.environ["HSMBRIDGE_SHIM_CONF"] = str(shim_conf(base / "cloudhsm-shim"))
    return shim_profile()


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
        return _opened(env, store, name)

    yield make
    for env in made:
        env.close()


@pytest.fixture
def kms_env(make_kms_env: Callable[..., KmsEnv]) -> KmsEnv:
    """A connected custom key store on a fresh SoftHSM2 token, through a real KmsService."""
    return make_kms_env()


@pytest.fixture
def fake_hsm() -> FakeHsm:
    """The in-memory HSM behind every `make_fake_env` environment of a test."""
    return FakeHsm()


@pytest.fixture
def make_fake_env(tmp_path: Path, fake_hsm: FakeHsm) -> Iterator[Callable[..., KmsEnv]]:
    """Factory: `make_kms_env`'s environment (configuration, inventory, credentials, SQLite
    metadata, demo PKI) with a token of one in-memory `FakeHsm` instead of SoftHSM2. The
    configuration still names the SoftHSM2 profile and a token label, which the fake connector
    resolves as the PKCS#11 one would."""
    hsm = fake_hsm
    made: list[KmsEnv] = []

    def make(store: bool = True, name: str = "TestKeyStore") -> KmsEnv:
        n = len(made)
        label, password = f"fake-token-{n:03d}", f"kmsuser-pass-{n:03d}"
        hsm.add_token(label, password)
        profile = replace(load_profile(SOFTHSM2_PROFILE), token_label=label)
        env = build_env(tmp_path / f"env{n}", ClusterBinding("", profile), password)
        env.connector = hsm.connector
        made.append(env)
        return _opened(env, store, name)

    yield make
    for env in made:
        env.close()


@pytest.fixture
def fake_env(make_fake_env: Callable[..., KmsEnv]) -> KmsEnv:
    """A connected custom key store on a fresh fake-HSM token, through a real KmsService."""
    return make_fake_env()


def _opened(env: KmsEnv, store: bool, name: str) -> KmsEnv:
    """Open the env's service; with `store`, create a custom key store and connect it."""
    service = env.open()
    if store:
        env.store_id = service.keystores.create(
            ADMIN, name, env.cluster_id, env.pki.ca_cert_pem, env.password
        )
        service.keystores.connect(ADMIN, env.store_id)
    return env


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """How much of the token stock the run used, to size HSMBRIDGE_TEST_TOKENS by: provisioning
    costs more per token the more there are (softhsm2-util reads every token each time)."""
    provisioned = config.stash.get(_SOFTHSM_ENV, None)
    if provisioned is not None:
        env, seconds = provisioned
        terminalreporter.write_line(
            f"SoftHSM2 tokens: {TOKEN_STOCK - len(env.stock)} used of {TOKEN_STOCK} provisioned"
            f" in {seconds:.1f} s (HSMBRIDGE_TEST_TOKENS)"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches a SoftHSM token through its fixtures is a `softhsm` test, marked
    or not, so `-m "not softhsm"` selects exactly the tests that run without one; the same
    for a PostgreSQL server and `postgres`."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "softhsm_env" in fixtures:
            item.add_marker(pytest.mark.softhsm)
        if "postgres_server" in fixtures:  # likewise: `-m "not postgres"` runs without one
            item.add_marker(pytest.mark.postgres)
