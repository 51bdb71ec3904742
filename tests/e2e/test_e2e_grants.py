"""Grants through boto3 on the shared server: create, list, list retirable, retire, revoke.

The shared server's caller is the environment's administrator, whose IAM policy allows
everything; grants name it as grantee and retiring principal. Cross-account grants, constraints
and who may use a grant are in tests/security/test_seed_cross_account.py and
tests/service/test_authorization.py.
"""

from __future__ import annotations

import uuid

from tests.callers import ADMIN_ARN
from tests.e2e.e2e_support import expect_error


def test_grant_lifecycle(kms, key):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    first = kms.create_grant(
        KeyId=key["KeyId"],
        GranteePrincipal=ADMIN_ARN,
        RetiringPrincipal=ADMIN_ARN,
        Operations=["Encrypt", "Decrypt"],
        Constraints={"EncryptionContextSubset": {"app": "e2e"}},
        Name=name,
    )
    assert len(first["GrantId"]) == 64
    again = kms.create_grant(
        KeyId=key["KeyId"],
        GranteePrincipal=ADMIN_ARN,
        RetiringPrincipal=ADMIN_ARN,
        Operations=["Decrypt", "Encrypt"],
        Constraints={"EncryptionContextSubset": {"app": "e2e"}},
        Name=name,
    )
    assert again["GrantId"] == first["GrantId"]  # Name: idempotent
    second = kms.create_grant(
        KeyId=key["Arn"], GranteePrincipal=ADMIN_ARN, Operations=["GenerateDataKey"]
    )
    # A fresh grant's token is accepted at once.
    kms.encrypt(
        KeyId=key["KeyId"],
        Plaintext=b"g",
        EncryptionContext={"app": "e2e"},
        GrantTokens=[first["GrantToken"], second["GrantToken"]],
    )

    grants = kms.list_grants(KeyId=key["KeyId"])
    assert grants["Truncated"] is False
    by_id = {g["GrantId"]: g for g in grants["Grants"]}
    assert set(by_id) == {first["GrantId"], second["GrantId"]}
    entry = by_id[first["GrantId"]]
    assert entry["KeyId"] == key["Arn"]
    assert entry["Name"] == name
    assert entry["Constraints"] == {"EncryptionContextSubset": {"app": "e2e"}}
    assert sorted(entry["Operations"]) == ["Decrypt", "Encrypt"]
    one = kms.list_grants(KeyId=key["KeyId"], GrantId=second["GrantId"])["Grants"]
    assert [g["GrantId"] for g in one] == [second["GrantId"]]
    page = kms.list_grants(KeyId=key["KeyId"], Limit=1)
    assert page["Truncated"] is True
    rest = kms.list_grants(KeyId=key["KeyId"], Marker=page["NextMarker"])["Grants"]
    assert {g["GrantId"] for g in page["Grants"] + rest} == set(by_id)

    retirable = kms.list_retirable_grants(RetiringPrincipal=ADMIN_ARN)["Grants"]
    assert first["GrantId"] in {g["GrantId"] for g in retirable}

    kms.retire_grant(GrantToken=first["GrantToken"])
    kms.revoke_grant(KeyId=key["KeyId"], GrantId=second["GrantId"])
    assert kms.list_grants(KeyId=key["KeyId"])["Grants"] == []


def test_grant_errors(kms, key):
    expect_error(
        "InvalidGrantTokenException", lambda: kms.retire_grant(GrantToken="not-a-grant-token")
    )
    expect_error(
        "InvalidGrantIdException",
        lambda: kms.revoke_grant(KeyId=key["KeyId"], GrantId="not-a-grant-id"),
    )
    expect_error(
        "NotFoundException", lambda: kms.revoke_grant(KeyId=key["KeyId"], GrantId="0" * 64)
    )
    expect_error(
        "ValidationException",
        lambda: kms.create_grant(
            KeyId=key["KeyId"], GranteePrincipal=ADMIN_ARN, Operations=["Sign"]
        ),
    )
    kms.disable_key(KeyId=key["KeyId"])
    expect_error(
        "DisabledException",
        lambda: kms.create_grant(
            KeyId=key["KeyId"], GranteePrincipal=ADMIN_ARN, Operations=["Encrypt"]
        ),
    )
