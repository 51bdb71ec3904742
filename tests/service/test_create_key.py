"""CreateKey in a CloudHSM key store, end to end on a real SoftHSM2 token (issue 2, spec §5).

The seed scenario: a CONNECTED store whose cluster has 2 ACTIVE HSMs in 2 AZs; CreateKey returns
exactly the KeyMetadata of spec §5.4, the key is in the token with CKA_LABEL = ARN and CKA_ID = key
id (read once through our backend and once through OpenSC's pkcs11-tool), and DescribeKey/ListKeys
answer the same metadata. Then every refusal, each followed by proof that nothing was created.
"""

from __future__ import annotations

import pytest

from hsmbridge.errors import (
    CloudHsmClusterInvalidConfigurationException,
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNotFoundException,
    MalformedPolicyDocumentException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.model import KeyState, Tag
from hsmbridge.protocol import codec
from hsmbridge.protocol.validation import output_validate
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REGION
from tests.service.checks import (
    assert_consistent,
    backend,
    hsm_labels,
    pkcs11_tool_secret_keys,
    rows,
)

pytestmark = pytest.mark.softhsm

# Spec §5.4: the fields KMS returns for an Enabled key in a CloudHSM store, no more, no fewer.
SPEC_FIELDS = {
    "AWSAccountId", "Arn", "CreationDate", "Description", "Enabled", "KeyId", "KeyManager",
    "KeyState", "KeyUsage", "KeySpec", "CustomerMasterKeySpec", "EncryptionAlgorithms",
    "MultiRegion", "Origin", "CloudHsmClusterId", "CustomKeyStoreId",
}  # fmt: skip


def _request(env, **overrides) -> CreateKeyRequest:
    fields = {"custom_key_store_id": env.store_id, "origin": "AWS_CLOUDHSM"} | overrides
    return CreateKeyRequest(**fields)


def _assert_nothing_created(env) -> None:
    assert rows(env) == []  # no metadata row of any lifecycle
    assert sum(hsm_labels(env).values()) == 0  # no HSM object at all


def test_seed_scenario_metadata_token_and_lookups(kms_env) -> None:
    env, svc = kms_env, kms_env.svc
    meta = svc.keys.create(
        ADMIN, _request(env, description="seed key", tags=(Tag("Project", "hsmbridge"),))
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
    made = {svc.keys.create(ADMIN, _request(kms_env)).key_id for _ in range(5)}
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


def test_unknown_and_disconnected_store_create_nothing(kms_env) -> None:
    svc = kms_env.svc
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keys.create(ADMIN, _request(kms_env, custom_key_store_id="cks-0123456789abcdef0"))
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    with pytest.raises(CustomKeyStoreInvalidStateException, match="CONNECTED"):
        svc.keys.create(ADMIN, _request(kms_env))
    assert rows(kms_env) == []
    svc.keystores.connect(ADMIN, kms_env.store_id)
    _assert_nothing_created(kms_env)


# (inventory AZs, HSM states, words the message must contain to say what is missing)
QUORUM_VIOLATIONS = [
    (("us-east-1a",), None, ["1 ACTIVE HSM", "at least 2 ACTIVE HSMs in 2 different"]),
    (("us-east-1a", "us-east-1a"), None, ["in 1 Availability Zone", "2 different Availability"]),
    (("us-east-1a", "us-east-1b"), ("ACTIVE", "DEGRADED"), ["us-east-1b is DEGRADED"]),
    ((), None, ["no ACTIVE HSMs"]),
]


def test_quorum_violations_name_what_is_missing_and_create_nothing(kms_env) -> None:
    # One env for all cases: the inventory is re-read at every check, so rewriting it is enough.
    for azs, states, words in QUORUM_VIOLATIONS:
        kms_env.write_inventory(azs=azs, states=states)
        with pytest.raises(CloudHsmClusterInvalidConfigurationException) as caught:
            kms_env.svc.keys.create(ADMIN, _request(kms_env))
        for word in words:
            assert word in caught.value.message, (azs, states, caught.value.message)
        assert "CreateKey" in caught.value.message
        _assert_nothing_created(kms_env)
    kms_env.write_inventory()  # back to 2 ACTIVE HSMs in 2 AZs: creation works again
    kms_env.svc.keys.create(ADMIN, _request(kms_env))
    assert_consistent(kms_env)


# (request overrides, exception spec §5.1-5.2 recommends)
BAD_REQUESTS = [
    ({"key_spec": "RSA_2048"}, UnsupportedOperationException),
    ({"customer_master_key_spec": "HMAC_256"}, UnsupportedOperationException),
    (
        {"key_spec": "SYMMETRIC_DEFAULT", "customer_master_key_spec": "RSA_2048"},
        ValidationException,
    ),
    ({"key_usage": "SIGN_VERIFY"}, UnsupportedOperationException),
    ({"key_usage": "GENERATE_VERIFY_MAC"}, UnsupportedOperationException),
    ({"multi_region": True}, UnsupportedOperationException),
    ({"xks_key_id": "ext-key-1"}, UnsupportedOperationException),
    ({"custom_key_store_id": None}, ValidationException),  # Origin=AWS_CLOUDHSM, no store
    ({"origin": "AWS_KMS"}, UnsupportedOperationException),  # store id with the wrong origin
    ({"origin": None}, UnsupportedOperationException),  # store id with the default AWS_KMS
    ({"origin": "EXTERNAL"}, UnsupportedOperationException),
    ({"origin": "AWS_KMS", "custom_key_store_id": None}, UnsupportedOperationException),
    ({"description": "x" * 8193}, ValidationException),
    ({"policy": "{not json"}, MalformedPolicyDocumentException),
    ({"tags": (Tag("aws:reserved", "v"),)}, TagException),
]


def test_bad_requests_raise_the_recommended_exception_and_create_nothing(kms_env) -> None:
    for overrides, expected in BAD_REQUESTS:
        with pytest.raises(expected) as caught:
            kms_env.svc.keys.create(ADMIN, _request(kms_env, **overrides))
        assert type(caught.value) is expected, overrides  # not merely a subclass of it
        assert not caught.value.fault, overrides  # all are the caller's fault (HTTP 400)
        _assert_nothing_created(kms_env)
    assert (
        kms_env.svc.keys.create(ADMIN, _request(kms_env, multi_region=False)).multi_region is False
    )
