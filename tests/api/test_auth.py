"""SigV4Verifier and load_principals as pure functions, checked against botocore's signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmbridge.errors import (
    ConfigError,
    ExpiredTokenException,
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.identity.sessions import Caller, SessionIssuer
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
    assert principal == Caller(ACCESS_KEY, "111122223333", PRINCIPAL_ARN)


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
    with pytest.raises(
        InvalidSignatureException, match=r"Signature not yet current: .* \+ 5 min\.\)$"
    ):
        verifier.verify("POST", "/", "", headers, b"{}", now=past)


def test_within_skew_is_accepted(verifier):
    headers = _signed()
    later = datetime.now(UTC) + timedelta(minutes=4)
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


# --- services and STS temporary credentials ------------------------------------------------------


def _signed_with(akid, secret, token=None, service="kms"):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    request = AWSRequest(method="POST", url="http://127.0.0.1:8080/", data=b"a=1", headers=headers)
    SigV4Auth(Credentials(akid, secret, token), service, REGION).add_auth(request)
    out = {k.lower(): v for k, v in request.headers.items()}
    out["host"] = "127.0.0.1:8080"
    return out


@pytest.fixture
def issuer():
    return SessionIssuer(bytes(range(32)))


@pytest.fixture
def session_verifier(tmp_path, issuer):
    creds = load_principals(write_credentials(tmp_path / "creds"))
    return SigV4Verifier(creds, REGION, sessions=issuer)


def _session(issuer, seconds=3600):
    return issuer.issue(
        principal_arn="arn:aws:sts::111122223333:assumed-role/r/s",
        account_id="111122223333",
        expiration=datetime.now(UTC) + timedelta(seconds=seconds),
        role_arn="arn:aws:iam::111122223333:role/r",
        role_id="AROAEXAMPLE",
        session_name="s",
        session_policy="{}",
    )


def test_the_route_decides_the_service(session_verifier):
    headers = _signed_with(ACCESS_KEY, SECRET_KEY, service="sts")
    caller = session_verifier.verify("POST", "/", "", headers, b"a=1", service="sts")
    assert caller.arn == PRINCIPAL_ARN
    with pytest.raises(InvalidSignatureException, match="scoped to correct service: 'kms'"):
        session_verifier.verify("POST", "/", "", headers, b"a=1")


def test_session_credentials(session_verifier, issuer):
    creds = _session(issuer)
    headers = _signed_with(creds.access_key_id, creds.secret_access_key, creds.session_token)
    caller = session_verifier.verify("POST", "/", "", headers, b"a=1")
    assert caller.arn == "arn:aws:sts::111122223333:assumed-role/r/s"
    assert caller.role_arn == "arn:aws:iam::111122223333:role/r"
    assert caller.session_policy == "{}"
    assert caller.is_temporary


def test_session_credentials_need_their_token(session_verifier, issuer):
    creds = _session(issuer)
    headers = _signed_with(creds.access_key_id, creds.secret_access_key)
    with pytest.raises(UnrecognizedClientException):
        session_verifier.verify("POST", "/", "", headers, b"a=1")


def test_session_credentials_without_an_issuer_are_unknown(verifier, issuer):
    creds = _session(issuer)
    headers = _signed_with(creds.access_key_id, creds.secret_access_key, creds.session_token)
    with pytest.raises(UnrecognizedClientException):
        verifier.verify("POST", "/", "", headers, b"a=1")


def test_expired_session(tmp_path, issuer):
    # The session's expiry follows the session clock (the service's); the signing window does not.
    creds = load_principals(write_credentials(tmp_path / "creds"))
    later = SigV4Verifier(
        creds,
        REGION,
        sessions=issuer,
        session_clock=lambda: datetime.now(UTC) + timedelta(seconds=901),
    )
    session = _session(issuer, seconds=900)
    headers = _signed_with(session.access_key_id, session.secret_access_key, session.session_token)
    with pytest.raises(ExpiredTokenException):
        later.verify("POST", "/", "", headers, b"a=1")


def test_token_with_long_term_keys_is_refused(session_verifier, issuer):
    headers = _signed_with(ACCESS_KEY, SECRET_KEY, _session(issuer).session_token)
    with pytest.raises(UnrecognizedClientException):
        session_verifier.verify("POST", "/", "", headers, b"a=1")
