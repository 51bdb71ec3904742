"""Custom key store lifecycle, key states and the deletion sweeper (§6.4),
over HTTP against a server of their own (they disconnect the store or move the clock)."""

from __future__ import annotations

import pytest

from hsmbridge.keystore.demo import make_demo_pki
from tests.cloudhsm_shim import runbook_password
from tests.conftest import SO_PIN
from tests.e2e.e2e_support import expect_error

pytestmark = pytest.mark.softhsm

DAY = 86_400


def _state(kms, key_id):
    return kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]


def test_key_store_lifecycle(fresh):
    kms, store_id = fresh.kms, fresh.store_id
    entry = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0]
    assert entry["CustomKeyStoreName"] == "E2eStore"
    assert entry["CloudHsmClusterId"] == fresh.env.cluster_id
    assert entry["CustomKeyStoreType"] == "AWS_CLOUDHSM"
    assert entry["TrustAnchorCertificate"].strip() == fresh.env.pki.ca_cert_pem.strip()
    by_name = kms.describe_custom_key_stores(CustomKeyStoreName="E2eStore")["CustomKeyStores"]
    assert [s["CustomKeyStoreId"] for s in by_name] == [store_id]
    assert len(kms.describe_custom_key_stores()["CustomKeyStores"]) == 1

    kms.connect_custom_key_store(CustomKeyStoreId=store_id)  # already CONNECTED: no-op
    expect_error(
        "CustomKeyStoreInvalidStateException",
        lambda: kms.update_custom_key_store(CustomKeyStoreId=store_id, KeyStorePassword="p" * 8),
    )
    expect_error(
        "CustomKeyStoreInvalidStateException",
        lambda: kms.delete_custom_key_store(CustomKeyStoreId=store_id),
    )
    kms.update_custom_key_store(CustomKeyStoreId=store_id, NewCustomKeyStoreName="Renamed")
    fresh.disconnect()
    assert fresh.store_state() == "DISCONNECTED"
    expect_error(
        "CustomKeyStoreInvalidStateException",
        lambda: kms.disconnect_custom_key_store(CustomKeyStoreId=store_id),
    )
    expect_error(
        "CustomKeyStoreInvalidStateException",
        lambda: kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id),
    )
    known = runbook_password(fresh.env.token_label, SO_PIN, fresh.env.password)
    kms.update_custom_key_store(CustomKeyStoreId=store_id, KeyStorePassword=known)
    expect_error(
        "CloudHsmClusterNotFoundException",
        lambda: kms.update_custom_key_store(
            CustomKeyStoreId=store_id, CloudHsmClusterId="cluster-234567abcde"
        ),
    )
    fresh.connect()

    key = fresh.create_key()
    fresh.disconnect()
    expect_error(
        "CustomKeyStoreHasCMKsException",
        lambda: kms.delete_custom_key_store(CustomKeyStoreId=store_id),
    )
    fresh.connect()
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    fresh.env.clock.advance(7 * DAY + 1)
    assert fresh.runtime.service.deletions.sweep() == 1
    fresh.disconnect()
    kms.delete_custom_key_store(CustomKeyStoreId=store_id)
    expect_error(
        "CustomKeyStoreNotFoundException",
        lambda: kms.describe_custom_key_stores(CustomKeyStoreId=store_id),
    )
    expect_error(
        "CustomKeyStoreNotFoundException",
        lambda: kms.connect_custom_key_store(CustomKeyStoreId=store_id),
    )


def test_key_store_creation_errors(fresh, lax):
    kms, env = fresh.kms, fresh.env

    def create(**overrides):
        params = {
            "CustomKeyStoreName": "Another",
            "CloudHsmClusterId": env.cluster_id,
            "TrustAnchorCertificate": env.pki.ca_cert_pem,
            "KeyStorePassword": env.password,
            **overrides,
        }
        return kms.create_custom_key_store(**params)

    expect_error("CustomKeyStoreNameInUseException", lambda: create(CustomKeyStoreName="E2eStore"))
    expect_error("CloudHsmClusterInUseException", create)
    expect_error(
        "CloudHsmClusterNotFoundException", lambda: create(CloudHsmClusterId="cluster-234567abcde")
    )
    wrong_anchor = make_demo_pki(env.cluster_id).ca_cert_pem
    fresh.disconnect()
    # Delete the store so the cluster is free again and the trust anchor is what fails.
    kms.delete_custom_key_store(CustomKeyStoreId=fresh.store_id)
    expect_error(
        "IncorrectTrustAnchorException", lambda: create(TrustAnchorCertificate=wrong_anchor)
    )
    expect_error(
        "ValidationException",
        lambda: lax.create_custom_key_store(
            CustomKeyStoreName="Short",
            CloudHsmClusterId=env.cluster_id,
            TrustAnchorCertificate=env.pki.ca_cert_pem,
            KeyStorePassword="short",
        ),
    )


def test_disabled_and_pending_deletion_refuse_crypto(fresh):
    kms = fresh.kms
    key = fresh.create_key()
    kid = key["KeyId"]
    blob = kms.encrypt(KeyId=kid, Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=kid)
    message = expect_error("DisabledException", lambda: kms.encrypt(KeyId=kid, Plaintext=b"x"))
    assert key["Arn"] in message
    expect_error("DisabledException", lambda: kms.decrypt(CiphertextBlob=blob))
    expect_error("DisabledException", lambda: kms.generate_data_key(KeyId=kid, KeySpec="AES_256"))
    kms.schedule_key_deletion(KeyId=kid, PendingWindowInDays=7)
    expect_error("KMSInvalidStateException", lambda: kms.encrypt(KeyId=kid, Plaintext=b"x"))
    expect_error("KMSInvalidStateException", lambda: kms.decrypt(CiphertextBlob=blob))


def test_disconnected_store_makes_keys_unavailable(fresh):
    kms = fresh.kms
    enabled, disabled, pending = (fresh.create_key()["KeyId"] for _ in range(3))
    blob = kms.encrypt(KeyId=enabled, Plaintext=b"before")["CiphertextBlob"]
    kms.disable_key(KeyId=disabled)
    kms.schedule_key_deletion(KeyId=pending, PendingWindowInDays=7)

    fresh.disconnect()
    assert _state(kms, enabled) == "Unavailable"
    assert kms.describe_key(KeyId=enabled)["KeyMetadata"]["Enabled"] is False
    assert _state(kms, disabled) == "Unavailable"
    assert _state(kms, pending) == "PendingDeletion"  # stays, so it can still be cancelled
    message = expect_error(
        "KMSInvalidStateException", lambda: kms.encrypt(KeyId=enabled, Plaintext=b"x")
    )
    assert "unavailable" in message
    expect_error("KMSInvalidStateException", lambda: kms.decrypt(CiphertextBlob=blob))
    expect_error(
        "KMSInvalidStateException",
        lambda: kms.generate_data_key(KeyId=enabled, KeySpec="AES_256"),
    )
    expect_error(
        "CustomKeyStoreInvalidStateException",
        lambda: kms.generate_random(NumberOfBytes=8, CustomKeyStoreId=fresh.store_id),
    )
    # Management stays allowed; DisableKey takes effect at reconnect, as in KMS.
    kms.disable_key(KeyId=enabled)
    kms.enable_key(KeyId=disabled)
    kms.tag_resource(KeyId=enabled, Tags=[{"TagKey": "while", "TagValue": "disconnected"}])
    assert _state(kms, enabled) == "Unavailable"

    fresh.connect()
    assert _state(kms, enabled) == "Disabled"
    assert _state(kms, disabled) == "Enabled"
    assert _state(kms, pending) == "PendingDeletion"
    kms.enable_key(KeyId=enabled)
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
    kms.cancel_key_deletion(KeyId=pending)
    assert _state(kms, pending) == "Disabled"


def test_sweeper_deletes_key_alias_and_material(fresh):
    kms, service = fresh.kms, fresh.runtime.service
    key = fresh.create_key()
    keep = fresh.create_key()
    kms.create_alias(AliasName="alias/e2e-doomed", TargetKeyId=key["KeyId"])
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    backend = service.ctx.connections.peek(fresh.store_id)
    assert len(backend.find_keys(key["Arn"])) == 1

    fresh.env.clock.advance(7 * DAY - 60)
    assert service.deletions.sweep() == 0  # the window is not over yet
    assert _state(kms, key["KeyId"]) == "PendingDeletion"

    fresh.env.clock.advance(60 + 1)
    assert service.deletions.sweep() == 1
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId=key["KeyId"]))
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId="alias/e2e-doomed"))
    names = [a["AliasName"] for a in kms.list_aliases()["Aliases"]]
    assert "alias/e2e-doomed" not in names
    assert backend.find_keys(key["Arn"]) == []
    listed = [k["KeyId"] for k in kms.list_keys()["Keys"]]
    assert listed == [keep["KeyId"]]
    assert _state(kms, keep["KeyId"]) == "Enabled"


def test_sweeper_while_disconnected_orphans_the_material(fresh):
    kms, service = fresh.kms, fresh.runtime.service
    key = fresh.create_key()
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    fresh.disconnect()
    fresh.env.clock.advance(7 * DAY + 1)
    assert service.deletions.sweep() == 1
    expect_error("NotFoundException", lambda: kms.describe_key(KeyId=key["KeyId"]))
    deleted = [e for e in fresh.runtime.audit.events if e.event_name == "DeleteKey"]
    assert len(deleted) == 1
    (status,) = deleted[0].additional["backingKeysDeletionStatus"]
    assert status["deletionStatus"] == "FAILURE"
    assert deleted[0].additional["clusterId"] == fresh.env.cluster_id
    # The material is still in the token: an orphan, as the audit event says.
    fresh.connect()
    live = service.ctx.connections.get(
        fresh.store_id, fresh.env.cluster_id, lambda: fresh.env.password
    )
    assert [k.label for k in live.find_keys(key["Arn"])] == [key["Arn"]]
