"""Authorization at the service layer on a fake HSM: key policies, IAM policies, cross-account
use, grants and the key-policy checks on write, as AWS KMS evaluates them.

The endpoint keeps the keys of `ACCOUNT` (111122223333). `tester` there has an IAM policy
allowing everything (what `hsmbridge init` writes); the other principals get exactly the IAM
policies each test writes into `iam/ACCOUNT.json`, which the service reads on the next call.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from hsmbridge.errors import (
    AccessDeniedException,
    InvalidGrantTokenException,
    MalformedPolicyDocumentException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.request import RequestContext
from hsmbridge.service.grants import CreateGrantRequest
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN, ADMIN_ARN, OTHER_ACCOUNT
from tests.harness import ACCOUNT, KmsEnv
from tests.iam_files import ALLOW_ALL, Iam, document, statement

ALICE_ARN = f"arn:aws:iam::{ACCOUNT}:user/alice"
ALICE = RequestContext(ALICE_ARN, ACCOUNT)
BOB_ARN = f"arn:aws:iam::{OTHER_ACCOUNT}:user/bob"
BOB = RequestContext(BOB_ARN, OTHER_ACCOUNT)
ROOT_STATEMENT = {
    "Sid": "Enable IAM User Permissions",
    "Effect": "Allow",
    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
    "Action": "kms:*",
    "Resource": "*",
}
USE = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]


def _iam(
    env: KmsEnv,
    *,
    alice: list[dict[str, Any]] | None = None,
    bob: Any = None,
    reopen: bool = True,
) -> None:
    """Write both accounts' IAM: tester may do anything; alice and bob get what is given. With
    `reopen`, the service gets a new directory object reading them; without, the one it has
    (which re-reads on every call here) notices the edit."""
    home = Iam(ACCOUNT)
    home.user("tester", ALLOW_ALL)
    home.user("alice", *(alice or []))
    home.write(env.root / "iam")
    other = Iam(OTHER_ACCOUNT, encoded=True)  # URL-encoded documents, as the IAM API returns
    other.user("bob", *([bob] if bob else []))
    other.write(env.root / "iam")
    if reopen:  # read at once (the service re-reads at most once a second)
        env.svc.ctx.access.iam = IamDirectory(env.root / "iam", interval_s=0)


def _key(env: KmsEnv, *statements: dict[str, Any], bypass: bool = True) -> tuple[str, str]:
    policy = json.dumps({"Version": "2012-10-17", "Statement": list(statements)})
    assert env.store_id is not None
    meta = env.svc.keys.create(
        ADMIN,
        CreateKeyRequest(
            custom_key_store_id=env.store_id,
            origin="AWS_CLOUDHSM",
            policy=policy,
            bypass_policy_lockout_safety_check=bypass,
        ),
    )
    return meta.key_id, meta.arn


def _denied(fn: Any, reason: str) -> str:
    with pytest.raises(AccessDeniedException) as caught:
        fn()
    assert reason in caught.value.message, caught.value.message
    return caught.value.message


def test_iam_alone_is_enough_only_when_the_key_policy_delegates_to_the_account(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env, alice=[document(statement("Allow", "kms:Encrypt"))])
    delegating, _ = _key(env, ROOT_STATEMENT)
    svc.crypto.encrypt(ALICE, delegating, b"x")  # key policy -> account -> IAM allows
    message = _denied(
        lambda: svc.crypto.generate_data_key(ALICE, delegating, key_spec="AES_256"),
        "because no identity-based policy allows the kms:GenerateDataKey action",
    )
    assert message.startswith(
        f"User: {ALICE_ARN} is not authorized to perform: kms:GenerateDataKey"
    )

    admin_only = {**ROOT_STATEMENT, "Principal": {"AWS": ADMIN_ARN}, "Sid": "admin"}
    closed, arn = _key(env, admin_only)
    _denied(
        lambda: svc.crypto.encrypt(ALICE, closed, b"x"),
        f"on resource: {arn} because no resource-based policy allows the kms:Encrypt action",
    )
    svc.crypto.encrypt(ADMIN, closed, b"x")  # named directly: no IAM needed (it has some anyway)


def test_a_key_policy_naming_the_user_needs_no_iam_policy(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)  # alice has no IAM policy at all
    direct = {"Effect": "Allow", "Principal": {"AWS": ALICE_ARN}, "Action": USE, "Resource": "*"}
    key_id, _ = _key(env, ROOT_STATEMENT, direct)
    blob = svc.crypto.encrypt(ALICE, key_id, b"direct").ciphertext_blob
    assert svc.crypto.decrypt(ALICE, blob).plaintext == b"direct"
    _denied(lambda: svc.keys.disable(ALICE, key_id), "no identity-based policy allows")


def test_an_explicit_deny_anywhere_wins(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env, alice=[document(statement("Allow", "kms:*"), statement("Deny", "kms:Decrypt"))])
    key_id, _ = _key(env, ROOT_STATEMENT)
    blob = svc.crypto.encrypt(ALICE, key_id, b"x").ciphertext_blob
    _denied(
        lambda: svc.crypto.decrypt(ALICE, blob),
        "with an explicit deny in an identity-based policy",
    )
    deny_all = {
        "Sid": "DenyAll",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:*",
        "Resource": "*",
    }
    locked, _ = _key(env, ROOT_STATEMENT, deny_all)
    _denied(
        lambda: svc.crypto.encrypt(ADMIN, locked, b"x"),
        "with an explicit deny in a resource-based policy",
    )


def test_conditions_on_the_encryption_context(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)
    only_finance = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE_ARN},
        "Action": ["kms:Encrypt", "kms:Decrypt"],
        "Resource": "*",
        "Condition": {"StringEquals": {"kms:EncryptionContext:Department": "Finance"}},
    }
    key_id, _ = _key(env, ROOT_STATEMENT, only_finance)
    ok = svc.crypto.encrypt(ALICE, key_id, b"x", context={"Department": "Finance"})
    assert svc.crypto.decrypt(ALICE, ok.ciphertext_blob, context={"Department": "Finance"})
    _denied(
        lambda: svc.crypto.encrypt(ALICE, key_id, b"x", context={"Department": "IT"}),
        # The root statement still delegates to IAM, where alice has nothing.
        "no identity-based policy allows",
    )
    _denied(lambda: svc.crypto.encrypt(ALICE, key_id, b"x"), "no identity-based policy allows")


def test_cross_account_use_needs_the_key_policy_and_the_callers_iam(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    external = {
        "Sid": "Allow use of the key",
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{OTHER_ACCOUNT}:root"},
        "Action": USE,
        "Resource": "*",
    }
    key_id, arn = _key(env, ROOT_STATEMENT, external)
    _iam(env)  # bob has no IAM policy in his own account
    _denied(lambda: svc.crypto.encrypt(BOB, arn, b"x"), "no identity-based policy allows")

    _iam(env, bob=document(statement("Allow", USE, arn)))
    blob = svc.crypto.encrypt(BOB, arn, b"across").ciphertext_blob
    assert svc.crypto.decrypt(BOB, blob).plaintext == b"across"
    assert svc.keys.describe(BOB, arn).arn == arn
    with pytest.raises(NotFoundException):
        svc.crypto.encrypt(BOB, key_id, b"x")  # a bare key id means a key of bob's account
    # Only some operations work across accounts, whatever the policies say.
    _iam(env, bob=document(statement("Allow", "kms:*", arn)))
    _denied(lambda: svc.keys.disable(BOB, arn), "kms:DisableKey")
    _denied(lambda: svc.keys.schedule_deletion(BOB, arn, 7), "kms:ScheduleKeyDeletion")
    _denied(lambda: svc.keys.list(BOB, None, None), "kms:ListKeys")  # IAM needs Resource "*"
    _iam(env, bob=document(statement("Allow", "kms:*")))
    assert svc.keys.list(BOB, None, None).items == ()  # bob's account holds no keys here

    # Without the key policy statement, bob's IAM policy alone does nothing.
    _, bare_arn = _key(env, ROOT_STATEMENT)
    _denied(lambda: svc.crypto.encrypt(BOB, bare_arn, b"x"), "no resource-based policy allows")


def test_another_account_cannot_create_resources_here(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env, bob=document(statement("Allow", "kms:*")))
    request = CreateKeyRequest(custom_key_store_id=env.store_id, origin="AWS_CLOUDHSM")
    with pytest.raises(UnsupportedOperationException, match="account 111122223333 only"):
        svc.keys.create(BOB, request)
    assert svc.keystores.describe(BOB).items == ()


def test_grants_allow_their_grantee_with_their_constraints(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)
    key_id, arn = _key(env, ROOT_STATEMENT)
    _denied(lambda: svc.crypto.encrypt(ALICE, key_id, b"x"), "no identity-based policy allows")
    issued = svc.grants.create(
        ADMIN,
        CreateGrantRequest(
            key_ref=key_id,
            grantee_principal=ALICE_ARN,
            operations=("Encrypt", "Decrypt"),
            retiring_principal=ADMIN_ARN,
            constraints={"EncryptionContextSubset": {"Purpose": "test"}},
            name="alice-crypto",
        ),
    )
    blob = svc.crypto.encrypt(ALICE, key_id, b"g", context={"purpose": "test", "x": "y"})
    assert svc.crypto.decrypt(ALICE, blob.ciphertext_blob, context={"purpose": "test", "x": "y"})
    _denied(  # values are case-sensitive
        lambda: svc.crypto.encrypt(ALICE, key_id, b"g", context={"Purpose": "TEST"}),
        "no identity-based policy allows",
    )
    _denied(
        lambda: svc.crypto.generate_data_key(ALICE, key_id, key_spec="AES_256"),
        "no identity-based policy allows",
    )
    # Name makes CreateGrant idempotent: same grant id, a new token.
    again = svc.grants.create(
        ADMIN,
        CreateGrantRequest(
            key_ref=key_id,
            grantee_principal=ALICE_ARN,
            operations=("Decrypt", "Encrypt"),
            retiring_principal=ADMIN_ARN,
            constraints={"EncryptionContextSubset": {"Purpose": "test"}},
            name="alice-crypto",
        ),
    )
    assert again.grant_id == issued.grant_id
    assert again.grant_token != issued.grant_token
    [listed] = svc.grants.list(ADMIN, key_id, None, None).items
    assert (listed.grantee_principal, listed.key_arn) == (ALICE_ARN, arn)
    assert svc.grants.list_retirable(ADMIN, ADMIN_ARN, None, None).items == (listed,)

    svc.grants.retire(ADMIN, grant_token=issued.grant_token, key_ref=None, grant_id=None)
    assert svc.grants.list(ADMIN, key_id, None, None).items == ()
    _denied(
        lambda: svc.crypto.encrypt(ALICE, key_id, b"g", context={"purpose": "test"}),
        "no identity-based policy allows",
    )


def test_a_grant_lets_another_accounts_principal_in_without_iam(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)  # bob: no IAM policy, and the key policy does not name his account
    key_id, arn = _key(env, ROOT_STATEMENT)
    _denied(lambda: svc.crypto.encrypt(BOB, arn, b"x"), "not authorized")
    grant = svc.grants.create(
        ADMIN,
        CreateGrantRequest(key_ref=key_id, grantee_principal=BOB_ARN, operations=("Encrypt",)),
    )
    assert svc.crypto.encrypt(BOB, arn, b"x").key_arn == arn
    _denied(lambda: svc.keys.describe(BOB, arn), "kms:DescribeKey")
    svc.grants.revoke(ADMIN, key_id, grant.grant_id)
    _denied(lambda: svc.crypto.encrypt(BOB, arn, b"x"), "not authorized")


def test_grant_input_rules(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)
    key_id, _ = _key(env, ROOT_STATEMENT)

    def create(**kwargs: Any) -> Any:
        fields: dict[str, Any] = {"key_ref": key_id, "grantee_principal": ALICE_ARN}
        fields.update(kwargs)
        return svc.grants.create(ADMIN, CreateGrantRequest(**fields))

    with pytest.raises(ValidationException, match="Sign"):
        create(operations=("Sign",))
    with pytest.raises(ValidationException, match="DescribeKey"):
        create(
            operations=("DescribeKey",),
            constraints={"EncryptionContextEquals": {"a": "b"}},
        )
    with pytest.raises(ValidationException, match="not a valid principal"):
        create(operations=("Encrypt",), grantee_principal="bob")
    with pytest.raises(ValidationException, match="not a valid principal in IAM"):
        create(operations=("Encrypt",), grantee_principal=f"arn:aws:iam::{ACCOUNT}:user/nobody")
    bad_token = RequestContext(ALICE_ARN, ACCOUNT, grant_tokens=("not-a-token",))
    with pytest.raises(InvalidGrantTokenException):
        svc.crypto.encrypt(bad_token, key_id, b"x")
    token = create(operations=("Encrypt",)).grant_token
    with_token = RequestContext(ALICE_ARN, ACCOUNT, grant_tokens=(token,))
    svc.crypto.encrypt(with_token, key_id, b"x")


def test_a_grantee_passes_on_no_more_than_its_grant(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)
    key_id, _ = _key(env, ROOT_STATEMENT)
    svc.grants.create(
        ADMIN,
        CreateGrantRequest(
            key_ref=key_id, grantee_principal=ALICE_ARN, operations=("CreateGrant", "Decrypt")
        ),
    )
    svc.grants.create(  # a subset of its own operations: allowed
        ALICE,
        CreateGrantRequest(key_ref=key_id, grantee_principal=BOB_ARN, operations=("Decrypt",)),
    )
    _denied(
        lambda: svc.grants.create(
            ALICE,
            CreateGrantRequest(key_ref=key_id, grantee_principal=BOB_ARN, operations=("Encrypt",)),
        ),
        "kms:CreateGrant",
    )


def test_key_policy_writes_run_the_lockout_and_principal_checks(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env)
    key_id, _ = _key(env, ROOT_STATEMENT)
    alice_only = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ALICE_ARN},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
    )
    with pytest.raises(MalformedPolicyDocumentException, match="will not allow you to update"):
        svc.policies.put(ADMIN, key_id, None, alice_only)
    assert json.loads(svc.policies.get(ADMIN, key_id, None))["Statement"][0] == ROOT_STATEMENT
    ghost = alice_only.replace("user/alice", "user/ghost")
    with pytest.raises(MalformedPolicyDocumentException, match="invalid principals"):
        svc.policies.put(ADMIN, key_id, None, ghost, bypass_lockout_check=True)
    svc.policies.put(ADMIN, key_id, None, alice_only, bypass_lockout_check=True)
    _denied(lambda: svc.keys.describe(ADMIN, key_id), "no resource-based policy allows")
    assert svc.keys.describe(ALICE, key_id).key_id == key_id
    # CreateKey runs the same checks on a Policy it is given.
    with pytest.raises(MalformedPolicyDocumentException, match="will not allow you to update"):
        _key(
            env,
            {
                "Effect": "Allow",
                "Principal": {"AWS": ALICE_ARN},
                "Action": "kms:*",
                "Resource": "*",
            },
            bypass=False,
        )


def test_ciphertexts_of_a_key_are_decrypted_only_for_whom_its_policy_allows(fake_env) -> None:
    env, svc = fake_env, fake_env.svc
    _iam(env, alice=[document(statement("Allow", "kms:Decrypt"))])
    key_id, _ = _key(env, ROOT_STATEMENT)
    blob = svc.crypto.encrypt(ADMIN, key_id, b"only-ours").ciphertext_blob
    assert svc.crypto.decrypt(ALICE, blob).plaintext == b"only-ours"
    _denied(lambda: svc.crypto.decrypt(BOB, blob), "kms:Decrypt")


def test_grants_for_aws_resources_need_a_principal_acting_for_an_aws_service(fake_env) -> None:
    """The console's "Allow attachment of persistent resources" statement: CreateGrant only
    when an integrated AWS service calls (`via_service` in the credentials file)."""
    env, svc = fake_env, fake_env.svc
    _iam(env, bob=document(statement("Allow", "kms:CreateGrant")))
    attach = {
        "Sid": "Allow attachment of persistent resources",
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{OTHER_ACCOUNT}:root"},
        "Action": ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"],
        "Resource": "*",
        "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
    }
    key_id, arn = _key(env, ROOT_STATEMENT, attach)
    request = CreateGrantRequest(key_ref=arn, grantee_principal=BOB_ARN, operations=("Decrypt",))
    _denied(lambda: svc.grants.create(BOB, request), "no resource-based policy allows")
    via_ec2 = RequestContext(BOB_ARN, OTHER_ACCOUNT, via_service="ec2.us-east-1.amazonaws.com")
    grant = svc.grants.create(via_ec2, request)
    assert [g.grant_id for g in svc.grants.list(ADMIN, key_id, None, None).items] == [
        grant.grant_id
    ]


def test_cached_decisions_follow_iam_edits_key_policy_changes_and_the_clock(fake_env) -> None:
    """Allowing decisions are cached per caller, key and inputs; every input that can change
    them (an IAM file edit, a new key policy, the time a condition reads) is honoured at once."""
    env, svc = fake_env, fake_env.svc
    _iam(env, alice=[document(statement("Allow", "kms:Encrypt"))])
    key_id, _ = _key(env, ROOT_STATEMENT)
    for _ in range(3):
        svc.crypto.encrypt(ALICE, key_id, b"x")
    # An IAM edit, read by the same directory object (its generation changes).
    deny = [document(statement("Allow", "kms:Encrypt"), statement("Deny", "kms:Encrypt"))]
    _iam(env, alice=deny, reopen=False)
    _denied(lambda: svc.crypto.encrypt(ALICE, key_id, b"x"), "explicit deny in an identity")
    # A new key policy.
    _iam(env, alice=[document(statement("Allow", "kms:Encrypt"))])
    svc.crypto.encrypt(ALICE, key_id, b"x")
    admin_only = {**ROOT_STATEMENT, "Principal": {"AWS": ADMIN_ARN}}
    svc.policies.put(ADMIN, key_id, None, json.dumps({"Statement": [admin_only]}))
    _denied(lambda: svc.crypto.encrypt(ALICE, key_id, b"x"), "no resource-based policy allows")
    # A condition on the time: never cached.
    until = {
        "Effect": "Allow",
        "Principal": {"AWS": ALICE_ARN},
        "Action": "kms:Encrypt",
        "Resource": "*",
        "Condition": {"NumericLessThan": {"aws:EpochTime": str(int(env.clock()) + 60)}},
    }
    svc.policies.put(ADMIN, key_id, None, json.dumps({"Statement": [admin_only, until]}))
    svc.crypto.encrypt(ALICE, key_id, b"x")
    svc.crypto.encrypt(ALICE, key_id, b"x")
    env.clock.advance(120)
    _denied(lambda: svc.crypto.encrypt(ALICE, key_id, b"x"), "not authorized")
