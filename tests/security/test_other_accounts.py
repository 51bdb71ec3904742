"""Principals that no policy lets in are denied through boto3, and every decision is audited.

Credentials are sections of the endpoint's credentials file (`aws_access_key_id`,
`aws_secret_access_key`, `principal_arn`); the principal's account is the one in its ARN. Here the
file holds the environment's own principal, a second principal of the configured account (a role
whose IAM policy allows KMS use) and one of another account that no key policy names; the server
is the production app (`create_app`) on a real SoftHSM store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.harness import ACCOUNT, KmsEnv
from tests.iam_files import ALLOW_ALL, Iam, document, statement
from tests.live import Live, served_with_store

pytestmark = pytest.mark.softhsm

FOREIGN_ARN = "arn:aws:iam::444455556666:user/mallory"
FOREIGN_KEY, FOREIGN_SECRET = "AKIAFOREIGNACCOUNT01", "foreign-secret-key-0001"
LOCAL_ARN = f"arn:aws:iam::{ACCOUNT}:role/operator"
LOCAL_KEY, LOCAL_SECRET = "AKIALOCALACCOUNTROLE", "local-secret-key-0001"


@pytest.fixture
def two_account_live(make_kms_env: Callable[..., KmsEnv]) -> Iterator[Live]:
    env = make_kms_env(store=False)
    creds = env.root / "credentials"
    creds.write_text(
        creds.read_text() + f"\n[mallory]\naws_access_key_id = {FOREIGN_KEY}\n"
        f"aws_secret_access_key = {FOREIGN_SECRET}\nprincipal_arn = {FOREIGN_ARN}\n"
        f"\n[operator]\naws_access_key_id = {LOCAL_KEY}\n"
        f"aws_secret_access_key = {LOCAL_SECRET}\nprincipal_arn = {LOCAL_ARN}\n"
    )
    iam = Iam(ACCOUNT)
    iam.user("tester", ALLOW_ALL)
    iam.role(
        "operator",
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                    "Action": "sts:AssumeRole",
                }
            ],
        },
        document(statement("Allow", ["kms:Encrypt", "kms:Decrypt", "kms:ListKeys"])),
    )
    iam.write(env.root / "iam")
    with served_with_store(env) as live:
        yield live


def _denied(call: Callable[..., Any], **params: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call(**params)
    error = caught.value.response["Error"]
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Code"] == "AccessDeniedException", error
    assert FOREIGN_ARN in error["Message"]
    return str(caught.value.response["ResponseMetadata"]["RequestId"])


def test_a_principal_of_another_account_is_denied(two_account_live: Live) -> None:
    live = two_account_live
    key = live.create_key()
    sealed = live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"ours")["CiphertextBlob"]
    foreign = live.client(access_key=FOREIGN_KEY, secret_key=FOREIGN_SECRET)
    request_ids = [
        _denied(foreign.list_keys),
        _denied(foreign.describe_key, KeyId=key["Arn"]),
        _denied(foreign.encrypt, KeyId=key["Arn"], Plaintext=b"theirs"),
        _denied(foreign.decrypt, CiphertextBlob=sealed),
        _denied(foreign.generate_data_key, KeyId=key["Arn"], KeySpec="AES_256"),
        _denied(foreign.create_key, Origin="AWS_CLOUDHSM", CustomKeyStoreId=live.store_id),
        _denied(foreign.schedule_key_deletion, KeyId=key["Arn"], PendingWindowInDays=7),
        _denied(foreign.describe_custom_key_stores),
        _denied(foreign.disconnect_custom_key_store, CustomKeyStoreId=live.store_id),
    ]
    # Nothing the foreign principal asked for happened.
    assert [k["KeyId"] for k in live.kms.list_keys()["Keys"]] == [key["KeyId"]]
    assert live.kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled"
    store = live.kms.describe_custom_key_stores(CustomKeyStoreId=live.store_id)
    assert store["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
    # Each denial is audited with the caller's identity and what decided it.
    events = {e["requestId"]: e for e in live.events()}
    for request_id in request_ids:
        event = events[request_id]
        assert event["principalArn"] == FOREIGN_ARN
        assert event["errorCode"] == "AccessDeniedException"
        [decision] = event["additionalEventData"]["authorization"]
        assert decision["decision"] == "Deny"
        assert decision["decidedBy"], decision
    # A bare key id names a key of the caller's own account, which holds none here.
    with pytest.raises(ClientError) as caught:
        foreign.encrypt(KeyId=key["KeyId"], Plaintext=b"theirs")
    assert caught.value.response["Error"]["Code"] == "NotFoundException"


def test_another_principal_of_the_configured_account_is_served(two_account_live: Live) -> None:
    """The control: the denial is about the account, not about being a second principal."""
    live = two_account_live
    key = live.create_key()
    local = live.client(access_key=LOCAL_KEY, secret_key=LOCAL_SECRET)
    sealed = local.encrypt(KeyId=key["KeyId"], Plaintext=b"ours")["CiphertextBlob"]
    assert live.kms.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"ours"
    assert key["KeyId"] in {k["KeyId"] for k in local.list_keys()["Keys"]}
    events = live.events()
    allowed = [e for e in events if e["principalArn"] == LOCAL_ARN and e["errorCode"] is None]
    assert allowed
    decision = allowed[0]["additionalEventData"]["authorization"][0]
    assert decision["decision"] == "Allow"
    with pytest.raises(ClientError) as caught:  # its IAM policy allows no more than that
        local.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    assert "no identity-based policy allows" in caught.value.response["Error"]["Message"]
