"""Contract tests of the HSM connector: the fake HSM the service tests run on refuses a login as the
PKCS#11 connector does on a real SoftHSM2 token, and its keys outlive a login as a token's do."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import pytest

from hsmbridge.backend.errors import HsmUnreachableError, KeyMissingError, LoginError
from hsmbridge.backend.interface import HsmConnector
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.config import ClusterBinding, builtin_profile, load_profile
from hsmbridge.model import ConnectionErrorCode
from tests.fake_hsm import FakeHsm, FakeHsmConnector


@dataclass
class Site:
    """One token behind `binding`, its kmsuser password, and connectors over cluster bindings."""

    binding: ClusterBinding
    password: str
    connector: Callable[[Mapping[str, ClusterBinding]], HsmConnector]

    def new_connector(self) -> HsmConnector:
        """A connector over this token's binding, as a (re)started service builds one."""
        return self.connector({self.binding.cluster_id: self.binding})


@pytest.fixture(params=["fake", pytest.param("softhsm", marks=pytest.mark.softhsm)])
def site(request: pytest.FixtureRequest) -> Site:
    if request.param == "fake":
        hsm = FakeHsm()
        hsm.add_token("fake-contract", "kmsuser-pass-contract")
        profile = replace(load_profile(builtin_profile("softhsm2")), token_label="fake-contract")
        binding = ClusterBinding("cluster-contract", profile)
        return Site(binding, "kmsuser-pass-contract", lambda c: FakeHsmConnector(hsm, c))
    binding, pin = request.getfixturevalue("softhsm_token")()
    return Site(binding, pin, Pkcs11Connector)


def test_wrong_password_is_invalid_credentials_and_leaves_nothing_behind(site: Site) -> None:
    cid = site.binding.cluster_id
    with pytest.raises(LoginError) as caught:
        site.new_connector().connect(cid, site.password + "-wrong")
    assert caught.value.reason is ConnectionErrorCode.INVALID_CREDENTIALS
    assert site.password not in str(caught.value)
    backend = site.new_connector().connect(cid, site.password)
    try:
        with pytest.raises(LoginError) as again:  # and while logged in
            site.new_connector().connect(cid, "not-the-password")
        assert again.value.reason is ConnectionErrorCode.INVALID_CREDENTIALS
        assert backend.ping().ok
    finally:
        backend.close()


def test_unknown_cluster_and_unknown_token_are_unreachable(site: Site) -> None:
    with pytest.raises(HsmUnreachableError, match="cluster-nope"):
        site.new_connector().connect("cluster-nope", site.password)
    profile = replace(site.binding.profile, token_label="no-such-tok")
    missing = ClusterBinding(site.binding.cluster_id, profile)
    with pytest.raises(HsmUnreachableError, match="no-such-tok"):
        site.connector({missing.cluster_id: missing}).connect(missing.cluster_id, site.password)


def test_keys_outlive_the_login_and_a_closed_login_is_unreachable(site: Site) -> None:
    cid, label = site.binding.cluster_id, f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}"
    first = site.new_connector().connect(cid, site.password)
    first.generate_key(label, b"outlives")
    sealed = first.encrypt(label, b"data", b"aad")
    first.close()
    with pytest.raises(HsmUnreachableError):
        first.encrypt(label, b"data", b"aad")
    second = site.new_connector().connect(cid, site.password)  # as after a restart
    try:
        assert [k.label for k in second.find_keys(label)] == [label]
        assert second.decrypt(label, sealed, b"aad") == b"data"
        assert second.destroy_key(label) == 1
        with pytest.raises(KeyMissingError):
            second.decrypt(label, sealed, b"aad")
    finally:
        second.close()
