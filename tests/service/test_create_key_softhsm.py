"""CreateKey in a CloudHSM key store, end to end on a real SoftHSM2 token (issue 2).

The seed scenario: a CONNECTED store whose cluster has 2 ACTIVE HSMs in 2 AZs; CreateKey returns
exactly the KeyMetadata KMS returns, the key is in the token with CKA_LABEL = ARN and CKA_ID = key
id (read once through our backend and once through OpenSC's pkcs11-tool), and DescribeKey/ListKeys
answer the same metadata. Then ListKeys paging and the cluster quorum, each ending with the token
checked against the metadata. The request refusals are in test_create_key.py, on a fake HSM.
"""

from __future__ import annotations

import pytest

from hsmbridge.errors import CloudHsmClusterInvalidConfigurationException
from hsmbridge.model import KeyState, Tag
from hsmbridge.protocol import codec
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REGION
from tests.output_shapes import output_validate
from tests.service.checks import (
    assert_consistent,
    assert_nothing_created,
    backend,
    pkcs11_tool_secret_keys,
)
from tests.service.steps import key_request

pytestmark = pytest.mark.softhsm

# Spec §5.4: the fields KMS returns for an Enabled key in a CloudHSM store, no more, no fewer.
SPEC_FIELDS = {
    "AWSAccountId", "Arn", "CreationDate", "Description", "Enabled", "KeyId", "KeyManager",
    "KeyState", "KeyUsage", "KeySpec", "CustomerMasterKeySpec", "EncryptionAlgorithms",
    "MultiRegion", "Origin", "CloudHsmClusterId", "CustomKeyStoreId",
}  # fmt: skip


def test_seed_scenario_metadata_token_and_lookups(kms_env) -> None:
    env, svc = kms_env, kms_env.svc
    meta = svc.keys.create(
        ADMIN, key_request(env, description="seed key", tags=(Tag("Project", "hsmbridge"),))
    )
    wire = codec.key_metadata(meta)
    assert set(wire) == SPEC_FIELDS
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{meta.key_id}"
    assert wire == {
        "AWSAccountId": ACCOUNT,
        "Arn": arn,
        "CreationDate": env.clock.now,
        "Description": "seed key",
        "Enabled": True,
        "KeyId": meta.key_id,
        "KeyManager": "CUSTOMER",
        "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeySpec": "SYMMETRIC_DEFAULT",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False,
        "Origin": "AWS_CLOUDHSM",
        "CloudHsmClusterId": env.cluster_id,
        "CustomKeyStoreId": env.store_id,
    }
    assert output_validate("CreateKey", {"KeyMetadata": wire}) == []
    assert svc.tags.list(ADMIN, meta.key_id, None, None).items == (Tag("Project", "hsmbridge"),)

    # The token, through our backend: exactly one object, labelled with the ARN.
    [info] = backend(env).find_keys(arn)
    assert (info.label, info.key_id) == (arn, meta.key_id.encode("ascii"))
    assert (info.key_type, info.value_len) == ("AES", 32)
    assert (info.token, info.private, info.sensitive, info.extractable) == (True, True, True, False)
    assert (info.always_sensitive, info.never_extractable, info.local) == (True, True, True)
    assert (info.encrypt, info.decrypt) == (True, True)
    assert not any((info.wrap, info.unwrap, info.sign, info.verify, info.derive))

    # The token, independently: OpenSC in another process, logged in with the kmsuser password.
    tool = pkcs11_tool_secret_keys(env)
    assert set(tool) == {arn}
    assert tool[arn]["header"] == "Secret Key Object; AES length 32"
    assert tool[arn]["id"] == meta.key_id.encode("ascii").hex()
    assert tool[arn]["usage"] == {"encrypt", "decrypt"}
    assert tool[arn]["access"] == {"sensitive", "always sensitive", "never extractable", "local"}

    # DescribeKey answers the same metadata by every identifier form.
    svc.aliases.create(ADMIN, "alias/seed", meta.key_id)
    alias_arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/seed"
    for ref in (meta.key_id, arn, "alias/seed", alias_arn):
        assert svc.keys.describe(ADMIN, ref) == meta, ref
    assert output_validate("DescribeKey", {"KeyMetadata": wire}) == []
    # The CreateKey audit event names the backing key (CKA_ID) and the cluster.
    [event] = [e for e in env.audit.events if e.event_name == "CreateKey"]
    assert event.key_arn == arn
    assert event.additional == {"backingKeyId": meta.key_id, "clusterId": env.cluster_id}


def test_list_keys_pages_with_limit_and_marker(kms_env) -> None:
    svc = kms_env.svc
    made = {svc.keys.create(ADMIN, key_request(kms_env)).key_id for _ in range(5)}
    seen: list[str] = []
    marker = None
    sizes = []
    while True:
        page = svc.keys.list(ADMIN, 2, marker)
        sizes.append(len(page.items))
        seen += [r.key_id for r in page.items]
        wire = codec.page(page, "Keys", "NextMarker", [codec.key_list_entry(r) for r in page.items])
        assert output_validate("ListKeys", wire) == []
        assert wire["Truncated"] is (page.next_marker is not None)
        if page.next_marker is None:
            break
        marker = page.next_marker
    assert sizes == [2, 2, 1]
    assert sorted(seen) == sorted(made)
    assert len(seen) == len(set(seen))
    # Each listed key describes to the metadata CreateKey would have returned.
    for key_id in seen:
        meta = svc.keys.describe(ADMIN, key_id)
        assert (meta.key_state, meta.custom_key_store_id) == (KeyState.ENABLED, kms_env.store_id)
    assert svc.keys.list(ADMIN, None, None).items == svc.keys.list(ADMIN, 100, None).items
    assert_consistent(kms_env)


# (inventory AZs, HSM states, cluster state, words the message must contain to say what is missing)
BOTH_AZS = ("us-east-1a", "us-east-1b")
QUORUM_VIOLATIONS = [
    (("us-east-1a",), None, "ACTIVE", ["1 ACTIVE HSM", "at least 2 ACTIVE HSMs in 2 different"]),
    (("us-east-1a", "us-east-1a"), None, "ACTIVE", ["in 1 Availability Zone", "2 different"]),
    (BOTH_AZS, ("ACTIVE", "DEGRADED"), "ACTIVE", ["us-east-1b is DEGRADED"]),
    ((), None, "ACTIVE", ["no ACTIVE HSMs"]),
    # Two ACTIVE HSMs in two AZs, but the cluster itself is not ACTIVE.
    (BOTH_AZS, None, "DEGRADED", ["is DEGRADED", "needs an ACTIVE cluster"]),
    (BOTH_AZS, None, "UNINITIALIZED", ["is UNINITIALIZED", "needs an ACTIVE cluster"]),
]


def test_quorum_violations_name_what_is_missing_and_create_nothing(kms_env) -> None:
    # One env for all cases: the inventory is re-read at every check, so rewriting it is enough.
    for azs, states, cluster_state, words in QUORUM_VIOLATIONS:
        kms_env.write_inventory(azs=azs, states=states, cluster_state=cluster_state)
        with pytest.raises(CloudHsmClusterInvalidConfigurationException) as caught:
            kms_env.svc.keys.create(ADMIN, key_request(kms_env))
        for word in words:
            assert word in caught.value.message, (azs, states, caught.value.message)
        assert "CreateKey" in caught.value.message
        assert_nothing_created(kms_env)
    kms_env.write_inventory()  # back to 2 ACTIVE HSMs in 2 AZs: creation works again
    kms_env.svc.keys.create(ADMIN, key_request(kms_env))
    assert_consistent(kms_env)
