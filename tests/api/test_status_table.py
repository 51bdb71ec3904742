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
from hsmbridge.protocol.errors import STATUS_BY_CODE, status_for
from hsmbridge.protocol.validation import kms_model
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


# Written out rather than derived from the classes' `fault` flags, which status_for itself reads:
# every other KMS error, and every common AWS error, is a 400.
SERVER_FAULT_STATUS = {
    "KMSInternalException": 500,
    "KeyUnavailableException": 500,
    "DependencyTimeoutException": 503,  # hsmbridge: "try again later", as a load balancer says
    "CloudHsmInternalFailureException": 500,  # the CloudHSM v2 API's one server fault
}


def _model_fault(code: str) -> bool | None:
    """The KMS model's fault flag for `code`; None for the common errors it does not list."""
    shape = kms_model().shape_for(code) if code in kms_model().shape_names else None
    return None if shape is None else bool(shape._shape_model.get("fault"))


@pytest.mark.parametrize("error_cls", ALL_KMS_ERRORS, ids=lambda c: c.code)
def test_status_matches_fault(error_cls):
    expected = SERVER_FAULT_STATUS.get(error_cls.code, 400)
    assert status_for(error_cls("m")) == expected
    model_fault = _model_fault(error_cls.code)
    if model_fault is not None:
        assert (expected >= 500) is model_fault  # the table above agrees with botocore's model


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
