"""Spec §3.7/§6.3: a CONNECTED store whose cluster has no ACTIVE HSM refuses cryptography while
the key state stays Enabled; the answer is cached briefly, and recovers with the HSMs. The HSM
states come from the inventory, so the token is a fake one."""

import pytest

from hsmbridge.errors import CustomKeyStoreInvalidStateException, KMSInvalidStateException
from hsmbridge.keystore.inventory import ClusterInfo, HsmInfo
from hsmbridge.model import KeyState
from hsmbridge.service.clusters import ClusterFacts
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN


def test_crypto_needs_an_active_hsm(fake_env):
    svc = fake_env.svc
    key = svc.keys.create(
        ADMIN, CreateKeyRequest(custom_key_store_id=fake_env.store_id, origin="AWS_CLOUDHSM")
    )
    blob = svc.crypto.encrypt(ADMIN, key.key_id, b"before").ciphertext_blob

    fake_env.write_inventory(states=("DEGRADED", "DELETED"))
    svc.ctx.clusters.forget(fake_env.cluster_id)  # skip the short cache instead of sleeping
    with pytest.raises(KMSInvalidStateException, match="no ACTIVE HSM"):
        svc.crypto.encrypt(ADMIN, key.key_id, b"during")
    with pytest.raises(KMSInvalidStateException):
        svc.crypto.decrypt(ADMIN, blob)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.crypto.generate_random(ADMIN, 16, fake_env.store_id)
    assert (
        svc.keys.describe(ADMIN, key.key_id).key_state is KeyState.ENABLED
    )  # state is not touched

    fake_env.write_inventory()
    svc.ctx.clusters.forget(fake_env.cluster_id)
    assert svc.crypto.decrypt(ADMIN, blob).plaintext == b"before"


class _CountingInventory:
    def __init__(self, active: int) -> None:
        self.calls = 0
        self.active = active

    def describe(self, cluster_id: str) -> ClusterInfo:
        self.calls += 1
        hsms = tuple(HsmInfo(f"hsm-{i}", "us-east-1a", "ACTIVE") for i in range(self.active))
        return ClusterInfo(cluster_id, "ACTIVE", hsms, {}, None, "hsm2m.medium", "vpc-1")


def test_active_hsm_answer_is_cached_for_the_ttl():
    now = [0.0]
    inventory = _CountingInventory(active=1)
    facts = ClusterFacts(inventory, ttl_s=2.0, monotonic=lambda: now[0])
    for _ in range(100):
        facts.require_active_hsm("cluster-abcdefghijk", "arn")
    assert inventory.calls == 1  # the hot path does not re-read the inventory per request
    inventory.active = 0
    now[0] = 2.5
    with pytest.raises(KMSInvalidStateException):
        facts.require_active_hsm("cluster-abcdefghijk", "arn")
    assert inventory.calls == 2
