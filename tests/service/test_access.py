"""Authorization at the service layer, on a fake HSM: who is refused changes nothing.

A principal of another account that no key policy names and no IAM policy of its own allows is
refused every operation with AccessDeniedException naming the principal and the KMS action,
before anything changes (no key row or object on the token, no alias, no policy, no store state,
no audit event); the same operations succeed for the endpoint account's administrator (an IAM
policy allowing everything), its root user (allowed by the default key policy without IAM
policies) and hsmbridge acting on its own behalf (`RequestContext.service_principal`). A refusal
happens before the service asks the HSM anything, so the fake's token, listed through our backend
as a SoftHSM2 one would be, is the witness. tests/service/test_authorization.py covers the
evaluation itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from hsmbridge.errors import AccessDeniedException
from hsmbridge.model import ConnectionState
from hsmbridge.policy.document import default_policy
from hsmbridge.request import RequestContext
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN, OUTSIDER, SERVICE
from tests.harness import ACCOUNT, KmsEnv
from tests.service.checks import hsm_labels, rows

ROOT = RequestContext(f"arn:aws:iam::{ACCOUNT}:root", ACCOUNT)
# A role of the endpoint's account that IAM does not know: it has no identity policies.
ROLE = RequestContext(f"arn:aws:iam::{ACCOUNT}:role/app", ACCOUNT)

Op = Callable[[RequestContext], Any]


def _policy(sid: str) -> str:
    doc = json.loads(default_policy("aws", ACCOUNT))
    doc["Statement"][0]["Sid"] = sid
    return json.dumps(doc)


def _connected_ops(env: KmsEnv, key_id: str, blob: bytes, tag: str) -> dict[str, Op]:
    """KMS action -> the call, for a CONNECTED store; `tag` keeps names unique per caller."""
    svc, sid = env.svc, env.store_id
    assert sid is not None
    request = CreateKeyRequest(custom_key_store_id=sid, origin="AWS_CLOUDHSM", description=tag)
    return {
        "kms:CreateKey": lambda c: svc.keys.create(c, request),
        "kms:DescribeKey": lambda c: svc.keys.describe(c, key_id),
        "kms:ListKeys": lambda c: svc.keys.list(c, None, None),
        "kms:Encrypt": lambda c: svc.crypto.encrypt(c, key_id, b"access"),
        "kms:Decrypt": lambda c: svc.crypto.decrypt(c, blob),
        "kms:CreateAlias": lambda c: svc.aliases.create(c, f"alias/{tag}", key_id),
        "kms:PutKeyPolicy": lambda c: svc.policies.put(c, key_id, None, _policy(tag)),
        "kms:DescribeCustomKeyStores": lambda c: svc.keystores.describe(c, sid),
        "kms:ScheduleKeyDeletion": lambda c: svc.keys.schedule_deletion(c, key_id, 7),
    }


def _snapshot(env: KmsEnv, key_id: str) -> tuple[object, ...]:
    """Everything a denied call could have changed."""
    svc, sid = env.svc, env.store_id
    return (
        sorted((r.key_id, r.lifecycle, r.base_state, r.policy, r.deletion_date) for r in rows(env)),
        sum(hsm_labels(env).values()),
        svc.aliases.list(ADMIN, None, None, None).items,
        svc.policies.get(ADMIN, key_id, None),
        svc.keystores.describe(ADMIN, sid).items,
        len(env.audit.events),
    )


def _assert_denied(op: Op, caller: RequestContext, action: str) -> None:
    with pytest.raises(AccessDeniedException) as caught:
        op(caller)
    message = caught.value.message
    assert caller.principal_arn in message, message
    assert f"perform: {action}" in message, message


def test_another_accounts_principal_is_denied_and_changes_nothing(fake_env) -> None:
    env, svc, sid = fake_env, fake_env.svc, fake_env.store_id
    request = CreateKeyRequest(custom_key_store_id=sid, origin="AWS_CLOUDHSM")
    key_id = svc.keys.create(ADMIN, request).key_id
    blob = svc.crypto.encrypt(ADMIN, key_id, b"secret").ciphertext_blob
    before = _snapshot(env, key_id)

    arn = svc.keys.describe(ADMIN, key_id).arn
    ops = _connected_ops(env, arn, blob, "denied")  # other accounts name keys by ARN
    ops["kms:DisconnectCustomKeyStore"] = lambda c: svc.keystores.disconnect(c, sid)
    for caller in (OUTSIDER, ROLE):
        for action, op in ops.items():
            _assert_denied(op, caller, action)
    assert _snapshot(env, key_id) == before
    assert svc.ctx.meta.get_alias("alias/denied") is None

    svc.keystores.disconnect(ADMIN, sid)
    _assert_denied(lambda c: svc.keystores.connect(c, sid), OUTSIDER, "kms:ConnectCustomKeyStore")
    [store] = svc.keystores.describe(ADMIN, sid).items
    assert store.connection_state is ConnectionState.DISCONNECTED
    svc.keystores.connect(ADMIN, sid)
    assert svc.crypto.decrypt(ADMIN, blob).plaintext == b"secret"  # the key was never touched


def test_the_endpoints_account_and_the_service_principal_are_allowed(fake_env) -> None:
    env, svc, sid = fake_env, fake_env.svc, fake_env.store_id
    request = CreateKeyRequest(custom_key_store_id=sid, origin="AWS_CLOUDHSM")
    for n, caller in enumerate((ADMIN, ROOT, SERVICE)):
        key_id = svc.keys.create(ADMIN, request).key_id
        blob = svc.crypto.encrypt(ADMIN, key_id, b"secret").ciphertext_blob
        tag = f"allowed-{n}"
        out = {action: op(caller) for action, op in _connected_ops(env, key_id, blob, tag).items()}

        created = out["kms:CreateKey"]
        assert svc.keys.describe(ADMIN, created.key_id).description == tag, caller
        assert created.key_id in {r.key_id for r in out["kms:ListKeys"].items}
        assert out["kms:DescribeKey"].key_id == key_id
        assert out["kms:Decrypt"].plaintext == b"secret"
        assert out["kms:Encrypt"].key_arn == out["kms:DescribeKey"].arn
        alias = svc.ctx.meta.get_alias(f"alias/{tag}")
        assert alias is not None
        assert alias.target_key_id == key_id
        assert json.loads(svc.policies.get(ADMIN, key_id, None))["Statement"][0]["Sid"] == tag
        assert out["kms:DescribeCustomKeyStores"].items[0].store_id == sid
        assert out["kms:ScheduleKeyDeletion"].deletion_date is not None

        svc.keystores.disconnect(caller, sid)
        svc.keystores.connect(caller, sid)
        [store] = svc.keystores.describe(caller, sid).items
        assert store.connection_state is ConnectionState.CONNECTED, caller
