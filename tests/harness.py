"""A complete hsmbridge environment for tests: an HSM token, describe-clusters inventory, demo PKI,
credentials, hsmbridge.toml and a KmsService (with a controllable clock and an in-memory audit
sink) over them.

Used through the fixtures in tests/conftest.py: `make_kms_env` / `kms_env` on a real SoftHSM2
token (the configuration's PKCS#11 connector), `make_fake_env` / `fake_env` on a token of
`tests.fake_hsm.FakeHsm` (the same files; `KmsEnv.connector` builds the service's connector from
the settings). Restarting the service (`env.restart()`) reopens the same files, as a real restart
would; the token, real or fake, keeps its keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hsmbridge import bootstrap
from hsmbridge.backend import HsmConnector
from hsmbridge.config import (
    ClusterBinding,
    Settings,
    builtin_profile,
    load_profile,
    load_settings,
)
from hsmbridge.identity.iam import write_demo_iam
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    DemoHsmSpec,
    DemoPki,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.service.kms import KmsService
from hsmbridge.trail.events import AuditEvent

REPO = Path(__file__).resolve().parent.parent
SOFTHSM2_PROFILE = builtin_profile("softhsm2")  # the package's copy, as an installed one reads
ACCOUNT = "111122223333"
REGION = "us-east-1"
ACCESS_KEY = "AKIAHSMBRIDGETEST001"
SECRET_KEY = "test-secret-key-for-hsmbridge-tests-0001"


class MemorySink:
    """AuditSink keeping every event in a list, for tests to read back."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


class FakeClock:
    """Injectable wall clock: tests move time instead of waiting."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class KmsEnv:
    root: Path
    config_path: Path
    cluster_id: str
    token_label: str
    password: str
    pki: DemoPki
    clock: FakeClock = field(default_factory=FakeClock)
    audit: MemorySink = field(default_factory=MemorySink)
    service: KmsService | None = None
    store_id: str | None = None
    # Settings -> the HSM connector to open the service with; None: the configuration's own.
    connector: Callable[[Settings], HsmConnector] | None = None
    # The failed-login backoff's monotonic clock; None: the real one.
    login_clock: FakeClock | None = None

    @property
    def settings(self) -> Settings:
        return load_settings(self.config_path)

    @property
    def svc(self) -> KmsService:
        assert self.service is not None
        return self.service

    @property
    def inventory_path(self) -> Path:
        return self.root / "clusters.json"

    def write_inventory(
        self,
        azs: tuple[str, ...] = ("us-east-1a", "us-east-1b"),
        states: tuple[str, ...] | None = None,
        cluster_state: str = "ACTIVE",
    ) -> None:
        """Rewrite the static inventory: one HSM per AZ given (states default to ACTIVE)."""
        hsms = tuple(
            DemoHsmSpec(az, (states or ("ACTIVE",) * len(azs))[i]) for i, az in enumerate(azs)
        )
        spec = DemoClusterSpec(
            self.cluster_id,
            self.pki.cluster_cert_pem,
            region=REGION,
            state=cluster_state,
            hsms=hsms,
            subnet_azs=("us-east-1a", "us-east-1b"),
        )
        self.inventory_path.write_text(json.dumps(describe_clusters_document([spec])))

    def add_clusters(self, *specs: DemoClusterSpec) -> None:
        """More clusters in the inventory, each bound to this env's token (takes effect at the
        next open or restart)."""
        doc = json.loads(self.inventory_path.read_text())
        doc["Clusters"] += describe_clusters_document(list(specs))["Clusters"]
        self.inventory_path.write_text(json.dumps(doc))
        binding = self.settings.binding(self.cluster_id)
        assert binding is not None, "the config binds no cluster to a profile"
        with self.config_path.open("a") as fh:
            for spec in specs:
                fh.write(
                    f'\n[[clusters]]\ncluster_id = "{spec.cluster_id}"\n'
                    f'{binding_lines(binding)}token_label = "{self.token_label}"\n'
                )

    def current_password(self, store_id: str | None = None) -> str:
        """kmsuser's password now, as the store's record has it: the one the test started
        with, or the one the rotation at connect set where the profile rotates."""
        ctx = self.svc.ctx
        return ctx.password_of(ctx.store_row(store_id or self.store_id or ""))

    def move_module(self, module_path: Path) -> None:
        """Point the env's cluster at another PKCS#11 module path (takes effect at the next
        open or restart): `[[clusters]] module_path`, whatever the profile."""
        text = self.config_path.read_text()
        text = re.sub(r"^module_path = .*\n", "", text, flags=re.M)
        line = f"module_path = {json.dumps(str(module_path))}\n"
        self.config_path.write_text(text.replace("token_label = ", line + "token_label = ", 1))

    def open(self, *, synchronous_connect: bool = True) -> KmsService:
        settings = self.settings
        self.service = bootstrap.open_service(
            settings,
            connector=None if self.connector is None else self.connector(settings),
            clock=self.clock,
            audit=self.audit,
            synchronous_connect=synchronous_connect,
            **({} if self.login_clock is None else {"login_clock": self.login_clock}),
        )
        return self.service

    def restart(self) -> KmsService:
        """Close the service and open a new one over the same files (no start-up hooks run)."""
        if self.service is not None:
            self.service.close()
        return self.open()

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None


def build_env(root: Path, binding: ClusterBinding, password: str) -> KmsEnv:
    """Write every file of an environment around one token (the binding's profile names it); no
    store is created."""
    root.mkdir(parents=True, exist_ok=True)
    cluster_id = new_cluster_id()
    token_label = binding.profile.token_label
    assert token_label is not None
    env = KmsEnv(
        root, root / "hsmbridge.toml", cluster_id, token_label, password, make_demo_pki(cluster_id)
    )
    env.write_inventory()
    (root / "customerCA.crt").write_text(env.pki.ca_cert_pem)
    creds = root / "credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"principal_arn = arn:aws:iam::{ACCOUNT}:user/tester\n"
    )
    creds.chmod(0o600)
    # What `hsmbridge init` writes too: the principal's account lets it do everything by IAM.
    write_demo_iam(root / "iam" / f"{ACCOUNT}.json", ACCOUNT, f"arn:aws:iam::{ACCOUNT}:user/tester")
    env.config_path.write_text(
        f'[service]\nregion = "{REGION}"\naccount_id = "{ACCOUNT}"\n\n'
        '[inventory]\nprovider = "static"\npath = "clusters.json"\n\n'
        f'[[clusters]]\ncluster_id = "{cluster_id}"\n'
        f'{binding_lines(binding)}token_label = "{token_label}"\n'
    )
    return env


def binding_lines(binding: ClusterBinding) -> str:
    """The `[[clusters]]` settings naming the binding's built-in profile, plus the module and
    the password change command when a test moved them (a private copy of a module is a separate
    library in this process; the `cloudhsm` profile runs through the CloudHSM stand-in)."""
    profile = binding.profile
    stock = load_profile(builtin_profile(profile.name))
    lines = f'profile = "{profile.name}"\n'
    if profile.module_path != stock.module_path:
        lines += f"module_path = {json.dumps(profile.module_path)}\n"
    if profile.password_change_command != stock.password_change_command:
        lines += f"password_change_command = {json.dumps(list(profile.password_change_command))}\n"
    return lines
