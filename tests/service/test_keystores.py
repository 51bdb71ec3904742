"""Custom key store lifecycle in the service, on a fake HSM (issue 2).

Create (idempotency and every refusal), Describe paging, Connect (the ConnectionErrorCode each
inventory fault produces, and the asynchronous path through CONNECTING), Update rules and Delete
rules. These are the service's rules over its metadata and inventory; the HSM behind them is
`tests.fake_hsm`. What needs the real token (login failures from the PKCS#11 library, key states
checked against the token, the password never leaking through the real backend) is in
test_keystores_softhsm.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from hsmbridge import ids
from hsmbridge.errors import (
    CloudHsmClusterInUseException,
    CloudHsmClusterInvalidConfigurationException,
    CloudHsmClusterNotActiveException,
    CloudHsmClusterNotFoundException,
    CloudHsmClusterNotRelatedException,
    CustomKeyStoreHasCMKsException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNameInUseException,
    CustomKeyStoreNotFoundException,
    IncorrectTrustAnchorException,
    InvalidMarkerException,
    LimitExceededException,
    ValidationException,
)
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionErrorCode, ConnectionState, CustomKeyStore, KeyState
from hsmbridge.protocol import codec
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN
from tests.harness import REGION, KmsEnv
from tests.output_shapes import output_validate
from tests.service.steps import new_key, store_state

C = ConnectionState


def _stores(env: KmsEnv) -> list[CustomKeyStore]:
    return list(env.svc.keystores.describe(ADMIN).items)


def _add_clusters(env: KmsEnv, *specs: DemoClusterSpec) -> None:
    env.add_clusters(*specs)
    env.restart()


def _fill_with_rows(env: KmsEnv, count: int) -> list[str]:
    """Stores that exist only as metadata rows: enough for quota and paging tests, which never
    reach the cluster checks."""
    made = []
    for i in range(count):
        store_id = ids.new_custom_key_store_id()
        store = CustomKeyStore(
            store_id, f"filler-{i}", new_cluster_id(), env.pki.ca_cert_pem, C.DISCONNECTED, 0.0
        )
        with env.svc.ctx.meta.write():
            env.svc.ctx.meta.put_key_store(
                StoredKeyStore(store, env.svc.ctx.vault.seal("filler-pass", store_id))
            )
        made.append(store_id)
    return made


# --- CreateCustomKeyStore ---------------------------------------------------------------------


def test_create_refusals_then_create_and_idempotent_retry(make_fake_env) -> None:
    env = make_fake_env(store=False)
    ks, anchor, pw = env.svc.keystores, env.pki.ca_cert_pem, env.password
    other_ca = make_demo_pki(new_cluster_id()).ca_cert_pem
    refusals = [
        (("S", "cluster-unknownabcd", anchor, pw), CloudHsmClusterNotFoundException, None),
        (("S", env.cluster_id, other_ca, pw), IncorrectTrustAnchorException, None),
        (("S", env.cluster_id, "not a certificate", pw), IncorrectTrustAnchorException, None),
        (("S", env.cluster_id, anchor[:200], pw), IncorrectTrustAnchorException, None),
        (("S", env.cluster_id, anchor, "short"), ValidationException, None),
        (("S", env.cluster_id, anchor, pw), CloudHsmClusterNotActiveException, "UNINITIALIZED"),
        (("S", env.cluster_id, anchor, pw), CloudHsmClusterInvalidConfigurationException, "1HSM"),
        (("S", env.cluster_id, anchor, pw), CloudHsmClusterInvalidConfigurationException, "1AZ"),
    ]
    for args, expected, inventory in refusals:
        if inventory == "UNINITIALIZED":
            env.write_inventory(cluster_state="UNINITIALIZED")
        elif inventory == "1HSM":
            env.write_inventory(azs=("us-east-1a",))
        elif inventory == "1AZ":
            env.write_inventory(azs=("us-east-1b", "us-east-1b"))
        with pytest.raises(expected) as caught:
            ks.create(ADMIN, *args)
        assert pw not in caught.value.message
        assert _stores(env) == [], expected  # nothing created
        env.write_inventory()
    assert "HSM" in str(caught.value.message)

    store_id = ks.create(ADMIN, "S", env.cluster_id, anchor, pw)
    assert ids.STORE_ID_RE.match(store_id)
    [store] = _stores(env)
    assert (store.store_id, store.name, store.connection_state) == (store_id, "S", C.DISCONNECTED)
    wire = codec.custom_key_store(store)
    assert "ConnectionErrorCode" not in wire
    assert output_validate("DescribeCustomKeyStores", codec.page(
        env.svc.keystores.describe(ADMIN), "CustomKeyStores", "NextMarker", [wire]
    )) == []  # fmt: skip
    # KMS: identical properties of a DISCONNECTED store → the same id, nothing new.
    assert ks.create(ADMIN, "S", env.cluster_id, anchor + "\n", pw) == store_id
    with pytest.raises(CustomKeyStoreNameInUseException):
        ks.create(ADMIN, "S", env.cluster_id, anchor, pw + "x")
    with pytest.raises(CloudHsmClusterInUseException):
        ks.create(ADMIN, "Other", env.cluster_id, anchor, pw)
    assert [s.store_id for s in _stores(env)] == [store_id]
    # Once connected the store is no longer "identical and disconnected": the name is in use.
    ks.connect(ADMIN, store_id)
    with pytest.raises(CustomKeyStoreNameInUseException):
        ks.create(ADMIN, "S", env.cluster_id, anchor, pw)


def test_limit_of_ten_stores_and_describe_paging(fake_env) -> None:
    ks = fake_env.svc.keystores
    fillers = _fill_with_rows(fake_env, 9)
    with pytest.raises(LimitExceededException):
        ks.create(ADMIN, "Eleventh", new_cluster_id(), fake_env.pki.ca_cert_pem, fake_env.password)
    assert len(_stores(fake_env)) == 10
    every = sorted([*fillers, fake_env.store_id])
    seen, marker, sizes = [], None, []
    while True:
        page = ks.describe(ADMIN, limit=4, marker=marker)
        sizes.append(len(page.items))
        seen += [s.store_id for s in page.items]
        wire = codec.page(
            page, "CustomKeyStores", "NextMarker", [codec.custom_key_store(s) for s in page.items]
        )
        assert output_validate("DescribeCustomKeyStores", wire) == []
        if page.next_marker is None:
            assert wire["Truncated"] is False
            assert "NextMarker" not in wire
            break
        marker = page.next_marker
    assert sizes == [4, 4, 2]
    assert seen == every
    assert ks.describe(ADMIN, store_id=fillers[3]).items[0].name == "filler-3"
    assert ks.describe(ADMIN, name="filler-3").items[0].store_id == fillers[3]
    with pytest.raises(ValidationException):
        ks.describe(ADMIN, store_id=fillers[3], name="filler-3")
    with pytest.raises(CustomKeyStoreNotFoundException):
        ks.describe(ADMIN, store_id="cks-00000000000000000")
    with pytest.raises(CustomKeyStoreNotFoundException):
        ks.describe(ADMIN, name="nope")
    with pytest.raises(InvalidMarkerException):
        ks.describe(ADMIN, marker="garbage")


# --- ConnectCustomKeyStore --------------------------------------------------------------------


def test_connect_error_codes_from_the_inventory(fake_env) -> None:
    ks, sid = fake_env.svc.keystores, fake_env.store_id
    cases = [
        ('{"Clusters": []}', ConnectionErrorCode.CLUSTER_NOT_FOUND),
        ((), ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS),
        ((("us-east-1a",), ("DEGRADED",)), ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS),
    ]
    ks.disconnect(ADMIN, sid)
    for inventory, code in cases:
        if isinstance(inventory, str):
            fake_env.inventory_path.write_text(inventory)
        elif inventory:
            fake_env.write_inventory(azs=inventory[0], states=inventory[1])
        else:
            fake_env.write_inventory(azs=())
        ks.connect(ADMIN, sid)
        assert store_state(fake_env) == (C.FAILED, code)
        assert fake_env.svc.ctx.connections.peek(sid) is None  # no login left behind
        ks.disconnect(ADMIN, sid)
    # One ACTIVE HSM is enough to connect, though not to create keys.
    fake_env.write_inventory(azs=("us-east-1a", "us-east-1b"), states=("ACTIVE", "DEGRADED"))
    ks.connect(ADMIN, sid)
    assert store_state(fake_env) == (C.CONNECTED, None)
    ks.disconnect(ADMIN, sid)
    # A cluster that is not ACTIVE is refused synchronously and the store stays DISCONNECTED.
    fake_env.write_inventory(cluster_state="UNINITIALIZED")
    with pytest.raises(CloudHsmClusterNotActiveException):
        ks.connect(ADMIN, sid)
    assert store_state(fake_env) == (C.DISCONNECTED, None)


def test_asynchronous_connect_goes_through_connecting(make_fake_env) -> None:
    env = make_fake_env(store=False)
    env.close()
    svc = env.open(synchronous_connect=False)
    sid = svc.keystores.create(ADMIN, "Async", env.cluster_id, env.pki.ca_cert_pem, env.password)
    # Hold the background half at its inventory read, so CONNECTING is observable whatever the
    # machine's load. Only the background thread waits: which reads the synchronous half makes
    # (and through which object) is not this test's business.
    release, inner = threading.Event(), svc.ctx.inventory
    caller_thread = threading.current_thread()

    class GatedInventory:
        def describe(self, cluster_id):
            if threading.current_thread() is not caller_thread:
                assert release.wait(10)
            return inner.describe(cluster_id)

    svc.ctx.inventory = GatedInventory()
    svc.keystores.connect(ADMIN, sid)  # returns while the login has not happened yet
    assert store_state(env, sid) == (C.CONNECTING, None)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keys.create(ADMIN, CreateKeyRequest(custom_key_store_id=sid, origin="AWS_CLOUDHSM"))
    release.set()
    deadline = time.monotonic() + 10
    while store_state(env, sid)[0] is C.CONNECTING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store_state(env, sid) == (C.CONNECTED, None)
    # The asynchronous failure path ends FAILED with the code, without raising to the caller.
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password="wrongpass1")
    svc.keystores.connect(ADMIN, sid)
    deadline = time.monotonic() + 10
    while store_state(env, sid)[0] is C.CONNECTING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store_state(env, sid) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)


# --- UpdateCustomKeyStore ---------------------------------------------------------------------


def test_update_rules(fake_env) -> None:
    ks, sid = fake_env.svc.keystores, fake_env.store_id
    ks.update(ADMIN, sid, new_name="Renamed")  # name only: fine while CONNECTED
    assert ks.describe(ADMIN, name="Renamed").items[0].store_id == sid
    with pytest.raises(CustomKeyStoreInvalidStateException):
        ks.update(ADMIN, sid, password="another-pass")
    with pytest.raises(CustomKeyStoreInvalidStateException):
        ks.update(ADMIN, sid, new_name="Again", cluster_id=fake_env.cluster_id)
    assert ks.describe(ADMIN, sid).items[0].name == "Renamed"  # a refused update changes nothing
    _fill_with_rows(fake_env, 1)
    with pytest.raises(CustomKeyStoreNameInUseException):
        ks.update(ADMIN, sid, new_name="filler-0")
    with pytest.raises(CustomKeyStoreNotFoundException):
        ks.update(ADMIN, "cks-00000000000000000", new_name="x")
    key = new_key(fake_env)

    # A restored cluster shares the certificate; an unrelated one has its own CA and certificate.
    unrelated_id, restored_id = new_cluster_id(), new_cluster_id()
    unrelated_pki = make_demo_pki(unrelated_id)
    _add_clusters(
        fake_env,
        DemoClusterSpec(unrelated_id, unrelated_pki.cluster_cert_pem, region=REGION),
        DemoClusterSpec(restored_id, fake_env.pki.cluster_cert_pem, region=REGION),
    )
    ks = fake_env.svc.keystores
    ks.disconnect(ADMIN, sid)
    with pytest.raises(CloudHsmClusterNotRelatedException):
        ks.update(ADMIN, sid, cluster_id=unrelated_id)
    with pytest.raises(CloudHsmClusterNotFoundException):
        ks.update(ADMIN, sid, cluster_id="cluster-unknownabcd")
    assert ks.describe(ADMIN, sid).items[0].cluster_id == fake_env.cluster_id
    ks.update(ADMIN, sid, cluster_id=restored_id)
    assert ks.describe(ADMIN, sid).items[0].cluster_id == restored_id
    ks.connect(ADMIN, sid)
    assert store_state(fake_env) == (C.CONNECTED, None)
    # The restored cluster is the same token here, so the key's material is still usable.
    assert fake_env.svc.crypto.generate_random(ADMIN, 8, sid)
    assert fake_env.svc.keys.describe(ADMIN, key).key_state is KeyState.ENABLED


# --- DeleteCustomKeyStore ---------------------------------------------------------------------


def test_delete_only_when_disconnected_and_empty(fake_env) -> None:
    svc, sid = fake_env.svc, fake_env.store_id
    key = new_key(fake_env)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keystores.delete(ADMIN, sid)
    svc.keys.schedule_deletion(ADMIN, key, 7)
    svc.keystores.disconnect(ADMIN, sid)
    with pytest.raises(CustomKeyStoreHasCMKsException):
        svc.keystores.delete(ADMIN, sid)  # a key pending deletion still counts
    svc.keystores.connect(ADMIN, sid)
    fake_env.clock.advance(7 * 86_400 + 1)
    assert svc.deletions.sweep() == 1
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.delete(ADMIN, sid)
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keystores.describe(ADMIN, sid)
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keystores.delete(ADMIN, sid)
    # Deleting the store leaves the cluster usable for a new store.
    new = svc.keystores.create(
        ADMIN, "Again", fake_env.cluster_id, fake_env.pki.ca_cert_pem, "newpass12"
    )
    assert new != sid
