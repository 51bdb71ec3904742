"""Custom key store lifecycle on a real SoftHSM2 token (issue 2, spec §3, §4, §6.3).

Create (idempotency and every refusal), Describe paging, Connect (sync and async, and each
ConnectionErrorCode a real failure produces), Disconnect and what it does to keys, Update rules,
Delete rules, and the kmsuser password never leaking into logs, the DB file, output or reprs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

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
    DisabledException,
    IncorrectTrustAnchorException,
    InvalidMarkerException,
    KMSInvalidStateException,
    LimitExceededException,
    ValidationException,
)
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.metadata.store import StoredKeyStore
from hsmbridge.model import ConnectionErrorCode, ConnectionState, CustomKeyStore, KeyState
from hsmbridge.protocol import codec
from hsmbridge.protocol.validation import output_validate
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN
from tests.harness import REGION, SOFTHSM2_PROFILE, KmsEnv
from tests.service.checks import assert_consistent

pytestmark = pytest.mark.softhsm
C = ConnectionState


def _state(env: KmsEnv, store_id: str | None = None) -> tuple[ConnectionState, object]:
    store = env.svc.keystores.describe(ADMIN, store_id or env.store_id).items[0]
    return store.connection_state, store.connection_error_code


def _new_key(env: KmsEnv) -> str:
    req = CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
    return env.svc.keys.create(ADMIN, req).key_id


def _stores(env: KmsEnv) -> list[CustomKeyStore]:
    return list(env.svc.keystores.describe(ADMIN).items)


def _add_clusters(env: KmsEnv, *specs: DemoClusterSpec) -> None:
    """Put more clusters into the inventory and bind each to the env's token, then restart."""
    doc = json.loads(env.inventory_path.read_text())
    doc["Clusters"] += describe_clusters_document(list(specs))["Clusters"]
    env.inventory_path.write_text(json.dumps(doc))
    profile = SOFTHSM2_PROFILE
    with env.config_path.open("a") as fh:
        for spec in specs:
            fh.write(
                f'\n[[clusters]]\ncluster_id = "{spec.cluster_id}"\nprofile = "{profile}"\n'
                f'token_label = "{env.token_label}"\n'
            )
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


def test_create_refusals_then_create_and_idempotent_retry(make_kms_env) -> None:
    env = make_kms_env(store=False)
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
    # KMS: identical properties of a DISCONNECTED store → the same id, nothing new (spec §4.1).
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


def test_limit_of_ten_stores_and_describe_paging(kms_env) -> None:
    ks = kms_env.svc.keystores
    fillers = _fill_with_rows(kms_env, 9)
    with pytest.raises(LimitExceededException):
        ks.create(ADMIN, "Eleventh", new_cluster_id(), kms_env.pki.ca_cert_pem, kms_env.password)
    assert len(_stores(kms_env)) == 10
    every = sorted([*fillers, kms_env.store_id])
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


def test_wrong_password_fails_with_invalid_credentials_until_fixed(kms_env) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    assert _state(kms_env) == (C.CONNECTED, None)
    ks.disconnect(ADMIN, sid)
    ks.update(ADMIN, sid, password="wrongpass1")
    ks.connect(ADMIN, sid)
    assert _state(kms_env) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)
    wire = codec.custom_key_store(ks.describe(ADMIN, sid).items[0])
    assert wire["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    # A FAILED store must be disconnected before it is connected again (spec §3.2).
    with pytest.raises(CustomKeyStoreInvalidStateException, match="disconnected"):
        ks.connect(ADMIN, sid)
    ks.disconnect(ADMIN, sid)
    assert _state(kms_env) == (C.DISCONNECTED, None)  # the error code goes with FAILED
    ks.update(ADMIN, sid, password=kms_env.password)
    ks.connect(ADMIN, sid)
    assert _state(kms_env) == (C.CONNECTED, None)
    _new_key(kms_env)


def test_connect_error_codes_from_the_inventory(kms_env) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    cases = [
        ('{"Clusters": []}', ConnectionErrorCode.CLUSTER_NOT_FOUND),
        ((), ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS),
        ((("us-east-1a",), ("DEGRADED",)), ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS),
    ]
    ks.disconnect(ADMIN, sid)
    for inventory, code in cases:
        if isinstance(inventory, str):
            kms_env.inventory_path.write_text(inventory)
        elif inventory:
            kms_env.write_inventory(azs=inventory[0], states=inventory[1])
        else:
            kms_env.write_inventory(azs=())
        ks.connect(ADMIN, sid)
        assert _state(kms_env) == (C.FAILED, code)
        assert kms_env.svc.ctx.connections.peek(sid) is None  # no login left behind
        ks.disconnect(ADMIN, sid)
    # One ACTIVE HSM is enough to connect (spec §3.7), though not to create keys.
    kms_env.write_inventory(azs=("us-east-1a", "us-east-1b"), states=("ACTIVE", "DEGRADED"))
    ks.connect(ADMIN, sid)
    assert _state(kms_env) == (C.CONNECTED, None)
    ks.disconnect(ADMIN, sid)
    # A cluster that is not ACTIVE is refused synchronously and the store stays DISCONNECTED.
    kms_env.write_inventory(cluster_state="UNINITIALIZED")
    with pytest.raises(CloudHsmClusterNotActiveException):
        ks.connect(ADMIN, sid)
    assert _state(kms_env) == (C.DISCONNECTED, None)


def test_unreachable_pkcs11_module_is_network_errors(kms_env, tmp_path: Path) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    ks.disconnect(ADMIN, sid)
    profile = SOFTHSM2_PROFILE.read_text()
    missing = tmp_path / "no-such-pkcs11.so"
    bad = tmp_path / "broken-profile.toml"
    bad.write_text(
        profile.replace("/usr/lib/softhsm/libsofthsm2.so", str(missing)).replace(
            'name = "softhsm2"', 'name = "broken"'
        )
    )
    config = kms_env.config_path.read_text()
    kms_env.config_path.write_text(config.replace(str(SOFTHSM2_PROFILE), str(bad)))
    kms_env.restart()
    kms_env.svc.keystores.connect(ADMIN, sid)
    assert _state(kms_env) == (C.FAILED, ConnectionErrorCode.NETWORK_ERRORS)


def test_asynchronous_connect_goes_through_connecting(make_kms_env) -> None:
    env = make_kms_env(store=False)
    env.close()
    svc = env.open(synchronous_connect=False)
    sid = svc.keystores.create(ADMIN, "Async", env.cluster_id, env.pki.ca_cert_pem, env.password)
    # Hold the background half at its first inventory read, so CONNECTING is observable.
    release, inner, calls = threading.Event(), svc.ctx.inventory, []

    class GatedInventory:
        def describe(self, cluster_id):
            calls.append(cluster_id)
            if len(calls) > 1:  # the synchronous pre-check is call 1
                assert release.wait(10)
            return inner.describe(cluster_id)

    svc.ctx.inventory = GatedInventory()
    svc.keystores.connect(ADMIN, sid)  # returns while the login has not happened yet
    assert _state(env, sid) == (C.CONNECTING, None)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keys.create(ADMIN, CreateKeyRequest(custom_key_store_id=sid, origin="AWS_CLOUDHSM"))
    release.set()
    deadline = time.monotonic() + 10
    while _state(env, sid)[0] is C.CONNECTING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _state(env, sid) == (C.CONNECTED, None)
    # The asynchronous failure path ends FAILED with the code, without raising to the caller.
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password="wrongpass1")
    svc.keystores.connect(ADMIN, sid)
    deadline = time.monotonic() + 10
    while _state(env, sid)[0] is C.CONNECTING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _state(env, sid) == (C.FAILED, ConnectionErrorCode.INVALID_CREDENTIALS)


# --- DisconnectCustomKeyStore and key states --------------------------------------------------


def test_disconnect_makes_keys_unavailable_and_management_still_works(kms_env) -> None:
    svc, sid = kms_env.svc, kms_env.store_id
    k_enabled, k_disabled, k_pending = (_new_key(kms_env) for _ in range(3))
    svc.keys.disable(ADMIN, k_disabled)
    svc.keys.schedule_deletion(ADMIN, k_pending, 7)
    blob = svc.crypto.encrypt(ADMIN, k_enabled, b"secret").ciphertext_blob
    svc.keystores.disconnect(ADMIN, sid)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keystores.disconnect(ADMIN, sid)
    states = {k: svc.keys.describe(ADMIN, k).key_state for k in (k_enabled, k_disabled, k_pending)}
    assert states == {
        k_enabled: KeyState.UNAVAILABLE,
        k_disabled: KeyState.UNAVAILABLE,
        k_pending: KeyState.PENDING_DELETION,  # stays, so deletion can still be cancelled
    }
    assert not any(svc.keys.describe(ADMIN, k).enabled for k in states)
    with pytest.raises(KMSInvalidStateException, match="unavailable"):
        svc.crypto.encrypt(ADMIN, k_enabled, b"more")
    with pytest.raises(KMSInvalidStateException, match="unavailable"):
        svc.crypto.decrypt(ADMIN, blob)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.crypto.generate_random(ADMIN, 16, sid)
    # Enable/Disable are accepted while Unavailable and take effect at reconnect (spec §6.2 [12]).
    svc.keys.disable(ADMIN, k_enabled)
    svc.keys.enable(ADMIN, k_disabled)
    assert svc.keys.describe(ADMIN, k_enabled).key_state is KeyState.UNAVAILABLE
    with pytest.raises(KMSInvalidStateException, match="pending deletion"):
        svc.keys.enable(ADMIN, k_pending)
    svc.keystores.connect(ADMIN, sid)
    after = {k: svc.keys.describe(ADMIN, k).key_state for k in states}
    assert after == {
        k_enabled: KeyState.DISABLED,
        k_disabled: KeyState.ENABLED,
        k_pending: KeyState.PENDING_DELETION,
    }
    with pytest.raises(DisabledException):
        svc.crypto.decrypt(ADMIN, blob)
    assert svc.crypto.decrypt(
        ADMIN, svc.crypto.encrypt(ADMIN, k_disabled, b"hi").ciphertext_blob
    ).plaintext == (b"hi")
    assert_consistent(kms_env)


# --- UpdateCustomKeyStore ---------------------------------------------------------------------


def test_update_rules(kms_env) -> None:
    ks, sid = kms_env.svc.keystores, kms_env.store_id
    ks.update(ADMIN, sid, new_name="Renamed")  # name only: fine while CONNECTED
    assert ks.describe(ADMIN, name="Renamed").items[0].store_id == sid
    with pytest.raises(CustomKeyStoreInvalidStateException):
        ks.update(ADMIN, sid, password="another-pass")
    with pytest.raises(CustomKeyStoreInvalidStateException):
        ks.update(ADMIN, sid, new_name="Again", cluster_id=kms_env.cluster_id)
    assert ks.describe(ADMIN, sid).items[0].name == "Renamed"  # a refused update changes nothing
    _fill_with_rows(kms_env, 1)
    with pytest.raises(CustomKeyStoreNameInUseException):
        ks.update(ADMIN, sid, new_name="filler-0")
    with pytest.raises(CustomKeyStoreNotFoundException):
        ks.update(ADMIN, "cks-00000000000000000", new_name="x")
    key = _new_key(kms_env)

    # A restored cluster shares the certificate; an unrelated one has its own CA and certificate.
    unrelated_id, restored_id = new_cluster_id(), new_cluster_id()
    unrelated_pki = make_demo_pki(unrelated_id)
    _add_clusters(
        kms_env,
        DemoClusterSpec(unrelated_id, unrelated_pki.cluster_cert_pem, region=REGION),
        DemoClusterSpec(restored_id, kms_env.pki.cluster_cert_pem, region=REGION),
    )
    ks = kms_env.svc.keystores
    ks.disconnect(ADMIN, sid)
    with pytest.raises(CloudHsmClusterNotRelatedException):
        ks.update(ADMIN, sid, cluster_id=unrelated_id)
    with pytest.raises(CloudHsmClusterNotFoundException):
        ks.update(ADMIN, sid, cluster_id="cluster-unknownabcd")
    assert ks.describe(ADMIN, sid).items[0].cluster_id == kms_env.cluster_id
    ks.update(ADMIN, sid, cluster_id=restored_id)
    assert ks.describe(ADMIN, sid).items[0].cluster_id == restored_id
    ks.connect(ADMIN, sid)
    assert _state(kms_env) == (C.CONNECTED, None)
    # The restored cluster is the same token here, so the key's material is still usable.
    assert kms_env.svc.crypto.generate_random(ADMIN, 8, sid)
    assert kms_env.svc.keys.describe(ADMIN, key).key_state is KeyState.ENABLED


# --- DeleteCustomKeyStore ---------------------------------------------------------------------


def test_delete_only_when_disconnected_and_empty(kms_env) -> None:
    svc, sid = kms_env.svc, kms_env.store_id
    key = _new_key(kms_env)
    with pytest.raises(CustomKeyStoreInvalidStateException):
        svc.keystores.delete(ADMIN, sid)
    svc.keys.schedule_deletion(ADMIN, key, 7)
    svc.keystores.disconnect(ADMIN, sid)
    with pytest.raises(CustomKeyStoreHasCMKsException):
        svc.keystores.delete(ADMIN, sid)  # a key pending deletion still counts
    svc.keystores.connect(ADMIN, sid)
    kms_env.clock.advance(7 * 86_400 + 1)
    assert svc.deletions.sweep() == 1
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.delete(ADMIN, sid)
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keystores.describe(ADMIN, sid)
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keystores.delete(ADMIN, sid)
    # Deleting the store leaves the cluster usable for a new store (spec §4.6).
    new = svc.keystores.create(
        ADMIN, "Again", kms_env.cluster_id, kms_env.pki.ca_cert_pem, "newpass12"
    )
    assert new != sid


# --- the kmsuser password never leaks ---------------------------------------------------------


def test_password_never_logged_stored_in_clear_returned_or_in_reprs(
    make_kms_env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = make_kms_env()
    svc, sid, secrets = env.svc, env.store_id, (env.password, "wrongpass1")
    key = _new_key(env)
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password="wrongpass1")
    svc.keystores.connect(ADMIN, sid)  # FAILED: INVALID_CREDENTIALS, logged as a warning
    svc.keystores.disconnect(ADMIN, sid)
    svc.keystores.update(ADMIN, sid, password=env.password)
    svc.keystores.connect(ADMIN, sid)
    # The failed login was logged, so the records below include the path that handles it.
    assert any("login as kmsuser failed" in r.getMessage() for r in caplog.records)
    shown = [
        "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records),
        json.dumps(codec.custom_key_store(svc.keystores.describe(ADMIN, sid).items[0])),
        json.dumps(codec.key_metadata(svc.keys.describe(ADMIN, key))),
        repr(svc.ctx),
        repr(svc.ctx.meta.get_key_store(sid)),
        repr(svc.keystores),
        repr(svc.ctx.connections.peek(sid)),
        "\n".join(e.to_json() for e in env.audit.events),
    ]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    svc.ctx.meta.close()  # checkpoint the WAL so the main file holds everything
    for path in env.settings.data_dir.iterdir():
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, path
