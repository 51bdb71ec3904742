"""A fake HSM addressed the way the real one is: tokens by label, each with its user PIN, reached
through the `[[clusters]]` bindings of a configuration.

Owns: `FakeHsm` (the tokens; they outlive every connector and every service, as a SoftHSM token
outlives a restart) and `FakeHsmConnector` (the `HsmConnector` for one `Settings`). The connector
refuses what `Pkcs11Connector` refuses, in the same vocabulary: a cluster without a binding or a
binding whose token does not exist is HsmUnreachableError, a wrong password LoginError with
INVALID_CREDENTIALS (the PIN is compared as the profile would send it to C_Login). Key objects
are `tests.fakes.FakeBackend`'s: labels unique, a missing label KeyMissingError, a closed login
HsmUnreachableError. tests/backend/test_connector_contract.py runs the refusals against both.
Used by the `make_fake_env` / `fake_env` fixtures in tests/conftest.py.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from hsmbridge.backend.errors import HsmUnreachableError, LoginError
from hsmbridge.config import ClusterBinding, Settings
from hsmbridge.model import ConnectionErrorCode
from tests.fakes import FakeBackend, FakeToken


@dataclass
class _Slot:
    pin: str
    token: FakeToken = field(default_factory=FakeToken)


class FakeHsm:
    """In-memory tokens by label; shared by every connector built over it."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self.logins = 0  # successful logins, over every connector
        self.failed_logins = 0  # logins refused for a wrong PIN, over every connector

    def add_token(self, label: str, user_pin: str) -> None:
        if label in self._slots:
            raise ValueError(f"the fake HSM already has a token labelled {label!r}")
        self._slots[label] = _Slot(user_pin)

    def token(self, label: str) -> FakeToken:
        return self._slots[label].token

    def set_pin(self, label: str, user_pin: str) -> None:
        """An officer sets the crypto user's password behind hsmbridge's back."""
        self._slots[label].pin = user_pin

    def connector(self, settings: Settings) -> FakeHsmConnector:
        """The connector for this configuration's cluster bindings (KmsEnv.connector)."""
        return FakeHsmConnector(self, settings.clusters)

    def login(self, binding: ClusterBinding, password: str) -> FakeBackend:
        label = binding.profile.token_label
        if label is None:  # the first slot with a token, as the PKCS#11 connector takes it
            label = next(iter(self._slots), None)
        slot = self._slots.get(label) if label is not None else None
        if slot is None:
            raise HsmUnreachableError(f"no token labelled {label!r} in the fake HSM")
        pin = binding.profile.login_pin(password)
        if not hmac.compare_digest(pin.encode(), slot.pin.encode()):
            self.failed_logins += 1
            raise LoginError(
                ConnectionErrorCode.INVALID_CREDENTIALS,
                f"the fake HSM refused the login to token {label!r}: incorrect PIN",
            )
        self.logins += 1
        return FakeBackend(slot.token)


class FakeHsmConnector:
    """HsmConnector over a FakeHsm: cluster id -> binding -> token label -> token."""

    def __init__(self, hsm: FakeHsm, clusters: Mapping[str, ClusterBinding]) -> None:
        self._hsm = hsm
        self._clusters = dict(clusters)

    def connect(self, cluster_id: str, password: str) -> FakeBackend:
        binding = self._clusters.get(cluster_id)
        if binding is None:
            raise HsmUnreachableError(f"no HSM is configured for cluster {cluster_id!r}")
        return self._hsm.login(binding, password)
