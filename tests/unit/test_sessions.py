"""STS session tokens (identity.sessions) and the server key file (bootstrap.sessions)."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hsmbridge.bootstrap.sessions import load_or_create_session_key
from hsmbridge.errors import ConfigError, ExpiredTokenException, UnrecognizedClientException
from hsmbridge.identity.sessions import SessionIssuer, TemporaryCredentials

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
KEY = bytes(range(32))
ROLE_SESSION = "arn:aws:sts::111122223333:assumed-role/reader/build-42"


def _issue(issuer: SessionIssuer, **kwargs: object) -> TemporaryCredentials:
    fields: dict[str, object] = {
        "principal_arn": ROLE_SESSION,
        "account_id": "111122223333",
        "expiration": NOW + timedelta(hours=1),
        "role_arn": "arn:aws:iam::111122223333:role/reader",
        "role_id": "AROAEXAMPLEROLEID0001",
        "session_name": "build-42",
        "session_policy": '{"Version":"2012-10-17","Statement":[]}',
    }
    fields.update(kwargs)
    return issuer.issue(**fields)  # type: ignore[arg-type]


def test_credentials_have_aws_shapes_and_verify():
    issuer = SessionIssuer(KEY)
    creds = _issue(issuer)
    assert creds.access_key_id.startswith("ASIA")
    assert len(creds.access_key_id) == 20
    assert creds.access_key_id.isalnum()
    assert creds.access_key_id.isupper()
    assert len(creds.secret_access_key) == 40
    assert creds.expiration == NOW + timedelta(hours=1)
    session = issuer.verify(creds.access_key_id, creds.session_token, NOW)
    assert session.principal_arn == ROLE_SESSION
    assert session.account_id == "111122223333"
    assert session.role_arn == "arn:aws:iam::111122223333:role/reader"
    assert session.user_id_for_caller == "AROAEXAMPLEROLEID0001:build-42"
    assert session.session_policy == '{"Version":"2012-10-17","Statement":[]}'
    assert session.secret_access_key == creds.secret_access_key
    assert session.expiration == creds.expiration


def test_every_issue_is_a_new_key():
    issuer = SessionIssuer(KEY)
    first, second = _issue(issuer), _issue(issuer)
    assert first.access_key_id != second.access_key_id
    assert first.secret_access_key != second.secret_access_key


def test_another_issuer_with_the_same_key_accepts_the_session():
    creds = _issue(SessionIssuer(KEY))
    session = SessionIssuer(bytes(KEY)).verify(creds.access_key_id, creds.session_token, NOW)
    assert session.secret_access_key == creds.secret_access_key


def test_a_token_of_another_key_is_refused():
    creds = _issue(SessionIssuer(KEY))
    with pytest.raises(UnrecognizedClientException, match=r"security token .* is invalid"):
        SessionIssuer(bytes(32)).verify(creds.access_key_id, creds.session_token, NOW)


def test_the_token_belongs_to_its_access_key():
    issuer = SessionIssuer(KEY)
    one, other = _issue(issuer), _issue(issuer)
    with pytest.raises(UnrecognizedClientException):
        issuer.verify(other.access_key_id, one.session_token, NOW)


def _tampered(token: str, **changes: object) -> str:
    prefix, payload, mac = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc.update(changes)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return f"{prefix}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{mac}"


@pytest.mark.parametrize(
    "changes",
    [
        {"p": "arn:aws:iam::111122223333:user/admin"},  # a different principal
        {"e": int((NOW + timedelta(days=365)).timestamp())},  # a longer life
        {"sp": None},  # without its session policy
        {"a": "444455556666"},
    ],
)
def test_tampered_payload_is_refused(changes):
    issuer = SessionIssuer(KEY)
    creds = _issue(issuer)
    with pytest.raises(UnrecognizedClientException):
        issuer.verify(creds.access_key_id, _tampered(creds.session_token, **changes), NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "HB1..",
        "HB1.e30.",
        "HB1.e30.AAAA",
        "HB2.e30.AAAA",
        "HB1.!!!.AAAA",
        "HB1.e30.AAAA." + "x" * 10,
        "HB1." + "A" * 9000 + ".AAAA",
    ],
)
def test_malformed_tokens_are_refused(token):
    with pytest.raises(UnrecognizedClientException):
        SessionIssuer(KEY).verify("ASIAAAAAAAAAAAAAAAAA", token, NOW)


def test_forged_mac_over_valid_payload_is_refused():
    issuer = SessionIssuer(KEY)
    creds = _issue(issuer)
    prefix, payload, mac = creds.session_token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    with pytest.raises(UnrecognizedClientException):
        issuer.verify(creds.access_key_id, f"{prefix}.{payload}.{flipped}", NOW)
    # Characters outside base64url are an error, not silently skipped.
    with pytest.raises(UnrecognizedClientException):
        issuer.verify(creds.access_key_id, f"{prefix}.{payload}*.{mac}", NOW)


def test_expiry():
    issuer = SessionIssuer(KEY)
    creds = _issue(issuer, expiration=NOW + timedelta(seconds=900))
    issuer.verify(creds.access_key_id, creds.session_token, NOW + timedelta(seconds=899))
    with pytest.raises(ExpiredTokenException, match="expired"):
        issuer.verify(creds.access_key_id, creds.session_token, NOW + timedelta(seconds=900))


def test_secrets_are_not_in_reprs():
    issuer = SessionIssuer(KEY)
    creds = _issue(issuer)
    session = issuer.verify(creds.access_key_id, creds.session_token, NOW)
    for text in (repr(creds), repr(session), repr(issuer)):
        assert creds.secret_access_key not in text
        assert creds.session_token not in text
        assert KEY.hex() not in text


def test_user_session_identity():
    issuer = SessionIssuer(KEY)
    creds = issuer.issue(
        principal_arn="arn:aws:iam::111122223333:user/alice",
        account_id="111122223333",
        expiration=NOW + timedelta(hours=12),
        user_id="AIDAEXAMPLEUSERID001",
    )
    session = issuer.verify(creds.access_key_id, creds.session_token, NOW)
    assert not session.is_role_session
    assert session.user_id_for_caller == "AIDAEXAMPLEUSERID001"


def test_key_must_be_32_bytes():
    with pytest.raises(ValueError):
        SessionIssuer(b"short")


# --- the key file ------------------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path: Path):
    path = tmp_path / "sts.key"
    key = load_or_create_session_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_session_key(path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["sts.key"]  # no temporary left behind


def test_key_file_readable_by_others_is_refused(tmp_path: Path):
    path = tmp_path / "sts.key"
    load_or_create_session_key(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_session_key(path)


def test_key_file_of_wrong_size_is_refused(tmp_path: Path):
    path = tmp_path / "sts.key"
    path.write_bytes(b"x" * 16)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="16 bytes"):
        load_or_create_session_key(path)


def _racer(path: str, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    start.wait()
    out.put(load_or_create_session_key(Path(path)).hex())


def test_racing_processes_agree_on_one_key(tmp_path: Path):
    path = tmp_path / "sts.key"
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    start = ctx.Event()
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(path), start, out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    start.set()
    keys = {out.get(timeout=30) for _ in procs}
    for proc in procs:
        proc.join(timeout=30)
    assert len(keys) == 1
    assert bytes.fromhex(keys.pop()) == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["sts.key"]
