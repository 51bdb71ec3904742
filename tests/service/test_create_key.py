"""CreateKey request rules in a CloudHSM key store, on a fake HSM (issue 2).

Every refusal (an unknown or disconnected store, each request KMS refuses) raises
the exception KMS answers and creates nothing: no metadata row, no object on the
token (the fake's, as our backend lists it). The seed scenario, what lands in a real token, and
the cluster quorum checked against it are in test_create_key_softhsm.py.
"""

from __future__ import annotations

import pytest

from hsmbridge.errors import (
    CustomKeyStoreInvalidStateException,
    CustomKeyStoreNotFoundException,
    MalformedPolicyDocumentException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.model import Tag
from tests.callers import ADMIN
from tests.service.checks import assert_nothing_created, rows
from tests.service.steps import key_request


def test_unknown_and_disconnected_store_create_nothing(fake_env) -> None:
    svc = fake_env.svc
    with pytest.raises(CustomKeyStoreNotFoundException):
        svc.keys.create(ADMIN, key_request(fake_env, custom_key_store_id="cks-0123456789abcdef0"))
    svc.keystores.disconnect(ADMIN, fake_env.store_id)
    with pytest.raises(CustomKeyStoreInvalidStateException, match="CONNECTED"):
        svc.keys.create(ADMIN, key_request(fake_env))
    assert rows(fake_env) == []
    svc.keystores.connect(ADMIN, fake_env.store_id)
    assert_nothing_created(fake_env)


# (request overrides, the exception KMS answers)
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


def test_bad_requests_raise_the_recommended_exception_and_create_nothing(fake_env) -> None:
    for overrides, expected in BAD_REQUESTS:
        with pytest.raises(expected) as caught:
            fake_env.svc.keys.create(ADMIN, key_request(fake_env, **overrides))
        assert type(caught.value) is expected, overrides  # not merely a subclass of it
        assert not caught.value.fault, overrides  # all are the caller's fault (HTTP 400)
        assert_nothing_created(fake_env)
    made = fake_env.svc.keys.create(ADMIN, key_request(fake_env, multi_region=False))
    assert made.multi_region is False
