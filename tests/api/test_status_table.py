"""The KmsError -> HTTP status table against botocore's own retry rules and the KMS model.

Faults must be retried by SDKs (5xx) and client errors must not be (400), except the codes
botocore treats as throttling, which it retries by code whatever the status.
"""

from __future__ import annotations

import inspect

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from botocore.retries.standard import (
    RetryContext,
    StandardRetryConditions,
    ThrottledRetryableChecker,
)

from hsmbridge import errors
from hsmbridge.api.errors import STATUS_BY_CODE, status_for
from hsmbridge.api.validation import kms_model
from tests.api.conftest import make_client

ALL_KMS_ERRORS = sorted(
    # The abstract bases (KmsError, ClientError) name no shape of their own and are left out.
    (
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.KmsError) and cls not in (errors.KmsError, errors.ClientError)
    ),
    key=lambda cls: cls.code,
)
THROTTLING_CODES = frozenset(ThrottledRetryableChecker._THROTTLED_ERROR_CODES)


def _retryable(code: str, status: int) -> bool:
    response = AWSResponse("http://x/", status, {}, None)
    context = RetryContext(
        attempt_number=1,
        operation_model=kms_model().operation_model("Decrypt"),
        parsed_response={"Error": {"Code": code, "Message": "m"}},
        http_response=response,
    )
    return StandardRetryConditions().is_retryable(context)


@pytest.mark.parametrize("error_cls", ALL_KMS_ERRORS, ids=lambda c: c.code)
def test_status_matches_fault(error_cls):
    status = status_for(error_cls("m"))
    assert (status >= 500) is error_cls.fault
    assert status in {400, 500, 503}


@pytest.mark.parametrize("error_cls", ALL_KMS_ERRORS, ids=lambda c: c.code)
def test_botocore_retries_exactly_faults_and_throttling(error_cls):
    expected = error_cls.fault or error_cls.code in THROTTLING_CODES
    assert _retryable(error_cls.code, status_for(error_cls("m"))) is expected


def test_bare_kms_error_is_a_500():
    assert status_for(errors.KmsError("m")) == 500


def test_table_names_only_faults():
    faults = {cls.code for cls in ALL_KMS_ERRORS if cls.fault}
    assert set(STATUS_BY_CODE) == faults
    assert STATUS_BY_CODE["DependencyTimeoutException"] == 503


def test_fault_flags_match_the_kms_model():
    model = kms_model()
    checked = 0
    for cls in ALL_KMS_ERRORS:
        try:
            shape = model.shape_for(cls.code)
        except Exception:  # noqa: S112 - common AWS errors are not in the KMS model
            continue
        # Shape.metadata drops the `fault` flag; the raw shape definition keeps it.
        assert bool(shape._shape_model.get("fault")) is cls.fault, cls.code
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("call", "operation", "attempts"),
    [
        (lambda c: c.decrypt(CiphertextBlob=b"x" * 16), "Decrypt", 2),  # 503: retried
        (lambda c: c.get_key_policy(KeyId="k"), "GetKeyPolicy", 2),  # 500: retried
        (lambda c: c.describe_key(KeyId="k"), "DescribeKey", 1),  # 400: not retried
    ],
)
def test_live_attempt_counts(server, stand, call, operation, attempts):
    client = make_client(server, attempts=2)
    before = stand.calls.get(operation, 0)
    with pytest.raises(ClientError):
        call(client)
    assert stand.calls.get(operation, 0) - before == attempts
