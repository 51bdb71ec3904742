"""The KMS guide's cross-account example, end to end with boto3 against a real server and token.

Bob is an IAM user in account 1 (111122223333). The KMS key lives in account 2 (444455556666),
the account this endpoint keeps keys for. Account 2's key policy `key-policy-acct-2` lets account
1 use the key in cryptographic operations; account 1's IAM policy lets the role `ExampleRole` use
it; the role's trust policy lets Bob assume it. The documents are the guide's, with their JSON
fixed (the IAM policy's stray `Principal` line removed: IAM policies have none) and the example key
ARN replaced by the real one. Bob assumes the role with boto3's STS client and uses the key by
ARN; every other arrangement the guide says is insufficient is denied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.harness import ACCOUNT, KmsEnv
from tests.iam_files import ALLOW_ALL, Iam, new_keys, write_credentials
from tests.live import Live, served_with_store

pytestmark = pytest.mark.softhsm

ACCOUNT_1, ACCOUNT_2 = "111122223333", "444455556666"
REGION = "us-west-2"
BOB_ARN = f"arn:aws:iam::{ACCOUNT_1}:user/bob"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT_1}:role/ExampleRole"
ADMIN_2 = new_keys("default", f"arn:aws:iam::{ACCOUNT_2}:user/admin")
BOB = new_keys("bob", BOB_ARN)
CRYPTO = [
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:DescribeKey",
]
KEY_POLICY_ACCT_2: dict[str, Any] = {
    "Id": "key-policy-acct-2",
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "Permission to use IAM policies",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_2}:root"},
            "Action": "kms:*",
            "Resource": "*",
        },
        {
            "Sid": "Allow account 1 to use this CMK",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_1}:root"},
            "Action": CRYPTO,
            "Resource": "*",
        },
    ],
}
TRUST: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": {
        "Principal": {"AWS": BOB_ARN},
        "Effect": "Allow",
        "Action": "sts:AssumeRole",
    },
}


def _role_policy(key_arn: str, actions: list[str] = CRYPTO) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": [key_arn]}],
    }


@pytest.fixture
def seed(make_kms_env: Callable[..., KmsEnv]) -> Iterator[Live]:
    """An endpoint keeping account 2's keys in us-west-2, with account 2's administrator and Bob."""
    env = make_kms_env(store=False)
    text = env.config_path.read_text()
    text = text.replace(f'account_id = "{ACCOUNT}"', f'account_id = "{ACCOUNT_2}"')
    env.config_path.write_text(text.replace('region = "us-east-1"', f'region = "{REGION}"'))
    write_credentials(env.root / "credentials", ADMIN_2, BOB)
    for stale in (env.root / "iam").glob("*.json"):
        stale.unlink()
    admin = Iam(ACCOUNT_2)
    admin.user("admin", ALLOW_ALL)
    admin.write(env.root / "iam")

    def as_admin(live: Live) -> None:
        live.kms = _client(live, "kms", ADMIN_2.access_key_id, ADMIN_2.secret)

    with served_with_store(env, prepare=as_admin) as live:
        yield live


def _client(live: Live, service: str, key: str, secret: str, token: str | None = None) -> Any:
    return boto3.client(
        service,
        endpoint_url=live.url,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def _account_1(live: Live, *, role_policy: dict[str, Any] | None) -> None:
    iam = Iam(ACCOUNT_1, encoded=True)  # as get-account-authorization-details returns them
    iam.user("bob")
    if role_policy is None:
        iam.role("ExampleRole", TRUST)
    else:
        iam.role("ExampleRole", TRUST, role_policy)
    iam.write(live.env.root / "iam")


def _as_bob_in_role(live: Live) -> Any:
    sts = _client(live, "sts", BOB.access_key_id, BOB.secret)
    # The server re-reads IAM files at most once a second: wait for it to see account 1's.
    deadline = time.monotonic() + 10
    while True:
        try:
            creds = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="bob-session")
            break
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    creds = creds["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    session = _client(
        live, "kms", creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
    )
    identity = _client(
        live, "sts", creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]
    ).get_caller_identity()
    assert identity["Arn"] == f"arn:aws:sts::{ACCOUNT_1}:assumed-role/ExampleRole/bob-session"
    return session


def _use(kms: Any, arn: str) -> None:
    """The guide's cryptographic operations, each by key ARN."""
    blob = kms.encrypt(KeyId=arn, Plaintext=b"cross-account")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob, KeyId=arn)["Plaintext"] == b"cross-account"
    data_key = kms.generate_data_key(KeyId=arn, KeySpec="AES_256")
    assert (
        kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    )
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["AWSAccountId"] == ACCOUNT_2


def _denied(call: Callable[..., Any], reason: str, **params: Any) -> None:
    with pytest.raises(ClientError) as caught:
        call(**params)
    error = caught.value.response["Error"]
    assert error["Code"] in ("AccessDeniedException", "AccessDenied"), error
    assert reason in error["Message"], error["Message"]


def _key(live: Live, policy: dict[str, Any]) -> str:
    arn: str = live.create_key(Policy=json.dumps(policy))["Arn"]
    assert arn.startswith(f"arn:aws:kms:{REGION}:{ACCOUNT_2}:key/")
    return arn


def test_bob_uses_the_key_in_account_2_through_example_role(seed: Live) -> None:
    arn = _key(seed, KEY_POLICY_ACCT_2)
    _account_1(seed, role_policy=_role_policy(arn))
    _use(_as_bob_in_role(seed), arn)
    events = [e for e in seed.events() if e["eventName"] == "Encrypt"]
    assert events[-1]["principalArn"].endswith(":assumed-role/ExampleRole/bob-session")
    assert events[-1]["additionalEventData"]["authorization"][0]["decision"] == "Allow"


def test_without_the_key_policy_statement_bob_is_denied(seed: Live) -> None:
    only_own = {**KEY_POLICY_ACCT_2, "Statement": KEY_POLICY_ACCT_2["Statement"][:1]}
    arn = _key(seed, only_own)
    _account_1(seed, role_policy=_role_policy(arn))
    kms = _as_bob_in_role(seed)
    _denied(kms.encrypt, "no resource-based policy allows", KeyId=arn, Plaintext=b"x")


def test_without_the_iam_policy_bob_is_denied(seed: Live) -> None:
    arn = _key(seed, KEY_POLICY_ACCT_2)
    _account_1(seed, role_policy=None)
    kms = _as_bob_in_role(seed)
    _denied(kms.encrypt, "no identity-based policy allows", KeyId=arn, Plaintext=b"x")
    _denied(kms.describe_key, "no identity-based policy allows", KeyId=arn)


def test_an_explicit_deny_in_the_key_policy_wins(seed: Live) -> None:
    deny = {
        "Sid": "Deny account 1 decryption",
        "Effect": "Deny",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_1}:root"},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    arn = _key(seed, {**KEY_POLICY_ACCT_2, "Statement": [*KEY_POLICY_ACCT_2["Statement"], deny]})
    _account_1(seed, role_policy=_role_policy(arn))
    kms = _as_bob_in_role(seed)
    blob = kms.encrypt(KeyId=arn, Plaintext=b"x")["CiphertextBlob"]
    _denied(kms.decrypt, "explicit deny in a resource-based policy", CiphertextBlob=blob)


def test_an_action_the_key_policy_does_not_list_is_denied(seed: Live) -> None:
    arn = _key(seed, KEY_POLICY_ACCT_2)
    # Account 1 delegates more than account 2 granted: the extra action stays denied.
    _account_1(seed, role_policy=_role_policy(arn, [*CRYPTO, "kms:CreateGrant"]))
    kms = _as_bob_in_role(seed)
    _denied(
        kms.create_grant,
        "no resource-based policy allows the kms:CreateGrant action",
        KeyId=arn,
        GranteePrincipal=ROLE_ARN,
        Operations=["Decrypt"],
    )


def test_bob_without_the_role_is_denied(seed: Live) -> None:
    arn = _key(seed, KEY_POLICY_ACCT_2)
    _account_1(seed, role_policy=_role_policy(arn))
    _use(_as_bob_in_role(seed), arn)  # the control, and the server now reads account 1's file
    kms = _client(seed, "kms", BOB.access_key_id, BOB.secret)
    _denied(kms.encrypt, "no identity-based policy allows", KeyId=arn, Plaintext=b"x")
    # The role's trust names Bob only: another principal of account 1 may not assume it.
    sts = _client(seed, "sts", ADMIN_2.access_key_id, ADMIN_2.secret)
    _denied(sts.assume_role, "sts:AssumeRole", RoleArn=ROLE_ARN, RoleSessionName="intruder")


def test_a_cross_account_grant_with_an_encryption_context_constraint(seed: Live) -> None:
    """Grants are the other way in: no key policy statement and no IAM policy for Bob."""
    own_only = {**KEY_POLICY_ACCT_2, "Statement": KEY_POLICY_ACCT_2["Statement"][:1]}
    arn = _key(seed, own_only)
    _account_1(seed, role_policy=None)
    bob = _client(seed, "kms", BOB.access_key_id, BOB.secret)
    _denied(bob.encrypt, "not authorized", KeyId=arn, Plaintext=b"x")
    grant = seed.kms.create_grant(
        KeyId=arn,
        GranteePrincipal=BOB_ARN,
        RetiringPrincipal=BOB_ARN,
        Operations=["Encrypt", "Decrypt"],
        Constraints={"EncryptionContextEquals": {"project": "seed"}},
    )
    context = {"project": "seed"}
    blob = bob.encrypt(
        KeyId=arn,
        Plaintext=b"granted",
        EncryptionContext=context,
        GrantTokens=[grant["GrantToken"]],
    )["CiphertextBlob"]
    assert bob.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"granted"
    _denied(
        bob.encrypt,
        "not authorized",
        KeyId=arn,
        Plaintext=b"x",
        EncryptionContext={"project": "other"},
    )
    listed = seed.kms.list_grants(KeyId=arn)["Grants"]
    assert [(g["GrantId"], g["GranteePrincipal"]) for g in listed] == [(grant["GrantId"], BOB_ARN)]
    assert listed[0]["IssuingAccount"] == f"arn:aws:iam::{ACCOUNT_2}:root"
    assert listed[0]["Constraints"] == {"EncryptionContextEquals": context}
    bob.retire_grant(GrantToken=grant["GrantToken"])  # Bob is the retiring principal
    assert seed.kms.list_grants(KeyId=arn)["Grants"] == []
    _denied(bob.encrypt, "not authorized", KeyId=arn, Plaintext=b"x", EncryptionContext=context)
