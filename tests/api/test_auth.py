"""SigV4Verifier and load_principals as pure functions, checked against botocore's signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmbridge.errors import (
    ConfigError,
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
)
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import Principal, load_principals
from tests.api.conftest import ACCESS_KEY, PRINCIPAL_ARN, REGION, SECRET_KEY, write_credentials


@pytest.fixture
def verifier(tmp_path):
    return SigV4Verifier(load_principals(write_credentials(tmp_path / "creds")), REGION)


def _signed(body=b"{}", query="", extra=None):
    url = "http://127.0.0.1:8080/" + (f"?{query}" if query else "")
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.X"}
    headers.update(extra or {})
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "kms", REGION).add_auth(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = "127.0.0.1:8080"
    return headers


def test_accepts_botocore_signature(verifier):
    headers = _signed()
    principal = verifier.verify("POST", "/", "", headers, b"{}")
    assert principal == Principal(ACCESS_KEY, "111122223333", PRINCIPAL_ARN)


def test_query_string_and_whitespace_are_canonicalised(verifier):
    headers = _signed(query="b=2&a=1%20x", extra={"X-Custom": "  a   b  "})
    headers["x-custom"] = "  a   b  "
    assert verifier.verify("POST", "/", "b=2&a=1%20x", headers, b"{}").arn == PRINCIPAL_ARN


def test_missing_authorization(verifier):
    with pytest.raises(MissingAuthenticationTokenException):
        verifier.verify("POST", "/", "", {"host": "h"}, b"")


def test_future_signature(verifier):
    headers = _signed()
    past = datetime.now(UTC) - timedelta(minutes=20)
    with pytest.raises(InvalidSignatureException, match=r"Signature not yet current: .* \+ 15"):
        verifier.verify("POST", "/", "", headers, b"{}", now=past)


def test_within_skew_is_accepted(verifier):
    headers = _signed()
    later = datetime.now(UTC) + timedelta(minutes=14)
    assert verifier.verify("POST", "/", "", headers, b"{}", now=later).arn == PRINCIPAL_ARN


def test_missing_date(verifier):
    headers = _signed()
    del headers["x-amz-date"]
    with pytest.raises(IncompleteSignatureException, match="X-Amz-Date"):
        verifier.verify("POST", "/", "", headers, b"{}")


def test_host_must_be_signed(verifier):
    headers = _signed()
    headers["authorization"] = headers["authorization"].replace(
        "SignedHeaders=content-type;host;", "SignedHeaders=content-type;"
    )
    with pytest.raises(InvalidSignatureException, match="'host' must be a 'SignedHeader'"):
        verifier.verify("POST", "/", "", headers, b"{}")


def test_content_sha256_mismatch(verifier):
    headers = _signed()
    headers["x-amz-content-sha256"] = "0" * 64
    with pytest.raises(InvalidSignatureException, match="x-amz-content-sha256"):
        verifier.verify("POST", "/", "", headers, b"{}")


def test_world_readable_credentials_rejected(tmp_path):
    path = write_credentials(tmp_path / "creds")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="world-readable"):
        load_principals(path)


def test_missing_credentials_file(tmp_path):
    with pytest.raises(ConfigError, match="not readable"):
        load_principals(tmp_path / "absent")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[a]\naws_access_key_id = A\naws_secret_access_key = s\n", "principal_arn"),
        (
            "[a]\naws_access_key_id = A\naws_secret_access_key = s\nprincipal_arn = arn:x\n",
            "not an IAM user or role ARN",
        ),
        ("", "defines no principals"),
        ("not ini", "cannot be read"),
    ],
)
def test_bad_credentials_files(tmp_path, text, match):
    path = tmp_path / "creds"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=match):
        load_principals(path)


def test_credential_repr_hides_secret(tmp_path):
    creds = load_principals(write_credentials(tmp_path / "creds"))
    assert SECRET_KEY not in repr(creds)
