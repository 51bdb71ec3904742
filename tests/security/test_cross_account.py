"""The account boundary through the real server and boto3: a valid SigV4 signature by a principal
of another account than the endpoint's is authenticated, then refused with AccessDeniedException
(KMS's HTTP 400) before anything changes, and the refusal is audited under that principal."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.callers import OUTSIDER_ARN
from tests.harness import KmsEnv
from tests.live import Live, start_live

pytestmark = pytest.mark.softhsm

OUTSIDER_KEY = "AKIAHSMBRIDGEOTHER01"
OUTSIDER_SECRET = "another-accounts-secret-for-hsmbridge-tests"


@pytest.fixture
def live_with_outsider(make_kms_env: Callable[..., KmsEnv]) -> Iterator[Live]:
    """A live server whose credentials file also holds a principal of another account."""
    env = make_kms_env(store=False)
    creds = env.root / "credentials"
    with creds.open("a", encoding="utf-8") as fh:
        fh.write(
            f"\n[outsider]\naws_access_key_id = {OUTSIDER_KEY}\n"
            f"aws_secret_access_key = {OUTSIDER_SECRET}\nprincipal_arn = {OUTSIDER_ARN}\n"
        )
    live = start_live(env)
    try:
        live.create_store()
        live.connect()
        yield live
    finally:
        live.close()


def _denied(call: Callable[[], Any]) -> tuple[int, str, str]:
    with pytest.raises(ClientError) as caught:
        call()
    resp = caught.value.response
    return (
        resp["ResponseMetadata"]["HTTPStatusCode"],
        resp["Error"]["Code"],
        resp["Error"]["Message"],
    )


def test_another_accounts_principal_gets_access_denied(live_with_outsider: Live) -> None:
    live = live_with_outsider
    key = live.create_key(Description="ours")
    blob = live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"secret")["CiphertextBlob"]
    before = live.kms.list_keys()["Keys"]
    outsider = live.client(access_key=OUTSIDER_KEY, secret_key=OUTSIDER_SECRET)

    calls: dict[str, Callable[[], Any]] = {
        "CreateKey": lambda: outsider.create_key(
            CustomKeyStoreId=live.store_id, Origin="AWS_CLOUDHSM"
        ),
        "DescribeKey": lambda: outsider.describe_key(KeyId=key["KeyId"]),
        "Encrypt": lambda: outsider.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
        "Decrypt": lambda: outsider.decrypt(CiphertextBlob=blob),
        "ListKeys": outsider.list_keys,
        "CreateAlias": lambda: outsider.create_alias(
            AliasName="alias/outsider", TargetKeyId=key["KeyId"]
        ),
        "DescribeCustomKeyStores": outsider.describe_custom_key_stores,
        "DisconnectCustomKeyStore": lambda: outsider.disconnect_custom_key_store(
            CustomKeyStoreId=live.store_id
        ),
    }
    for operation, call in calls.items():
        status, code, message = _denied(call)
        assert (status, code) == (400, "AccessDeniedException"), operation
        assert OUTSIDER_ARN in message, message
        assert f"kms:{operation}" in message, message

    # Nothing changed, and the endpoint's own principal is still served.
    assert live.kms.list_keys()["Keys"] == before
    assert live.kms.list_aliases()["Aliases"] == []
    [store] = live.kms.describe_custom_key_stores()["CustomKeyStores"]
    assert store["ConnectionState"] == "CONNECTED"
    assert live.kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"

    denied = [e for e in live.events() if e["errorCode"] == "AccessDeniedException"]
    assert [e["eventName"] for e in denied] == list(calls)
    assert {e["principalArn"] for e in denied} == {OUTSIDER_ARN}
