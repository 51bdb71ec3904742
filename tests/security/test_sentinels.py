"""Sentinel secrets: the full API flow through boto3 against the real server with recognisable
secrets, then a search for each secret (raw, hex, base64) in everything the service emitted: every
log record (DEBUG, captured and written to a file), every audit line, every error message and
body, /metrics, /health, and every file under the environment's directory, the metadata database
included (its sealed password blob must not hold the password in clear).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path

import pkcs11
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hsmbridge.http.logs import JsonFormatter, RequestIdFilter
from tests.cloudhsm_shim import run_hsm, user_changes_password
from tests.conftest import SO_PIN, SOFTHSM_MODULE
from tests.harness import ACCESS_KEY, REGION, SECRET_KEY
from tests.live import HTTP, Live, start_live

pytestmark = pytest.mark.softhsm

PASSWORD = "SentinelPw0rd77"
WRONG_PASSWORD = "WrongSentinelPw99"
CLIENT_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")  # the test's own client side


class _ServerSide(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(CLIENT_LOGGERS)


def _forms(secret: bytes) -> set[bytes]:
    """The encodings a leak would take: raw, hex (both cases), base64 (standard and URL-safe)."""
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    forms |= {base64.b64encode(secret), base64.urlsafe_b64encode(secret)}
    # A base64 encoder may strip padding; look for the unpadded form too.
    return forms | {f.rstrip(b"=") for f in set(forms) if f.endswith(b"=")}


def _set_token_pin(live_env, new_pin: str) -> None:
    """Make the kmsuser password (= SoftHSM user PIN) the sentinel before the service logs in.

    In-process (python-pkcs11 memoises the module per path): a PIN changed by another process
    is not seen by a SoftHSM instance that has already read the token.
    """
    if run_hsm() == "cloudhsm-shim":  # a crypto user's password is the stand-in's to change
        user_changes_password(live_env.token_label, live_env.password, new_pin)
        live_env.password = new_pin
        return
    lib = pkcs11.lib(SOFTHSM_MODULE)
    token = lib.get_token(token_label=live_env.token_label)
    with token.open(rw=True, user_pin=live_env.password) as session:
        session.set_pin(live_env.password, new_pin)
    live_env.password = new_pin


def _raw_encrypt_with_bad_signature(live: Live, plaintext: bytes) -> bytes:
    body = json.dumps(
        {"KeyId": "alias/sentinel", "Plaintext": base64.b64encode(plaintext).decode()}
    ).encode()
    request = AWSRequest(
        method="POST",
        url=live.url + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.Encrypt",
        },
    )
    SigV4Auth(Credentials(ACCESS_KEY, "not-the-secret"), "kms", REGION).add_auth(request)
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    resp = HTTP.request("POST", live.url + "/", body=body, headers=headers, retries=False)
    assert resp.status == 400
    return resp.data


class Flow:
    """Runs the API flow and keeps every secret it used or received, and every error it saw."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.kms = live.kms
        self.tag = secrets.token_hex(6)
        self.plaintext = f"SENTINEL-PLAINTEXT-{self.tag}".encode()
        self.secrets: dict[str, bytes] = {
            "kmsuser password / user PIN": PASSWORD.encode(),
            "wrong password": WRONG_PASSWORD.encode(),
            "SO PIN": SO_PIN.encode(),
            "AWS secret access key": SECRET_KEY.encode(),
            "plaintext": self.plaintext,
        }
        self.errors: list[str] = []

    def expect_error(self, call, code: str) -> None:
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] == code, info.value.response
        self.errors.append(str(info.value) + json.dumps(info.value.response, default=str))

    def run(self) -> None:
        live, kms = self.live, self.kms
        live.create_store(PASSWORD)
        live.connect()
        key = live.create_key(Description="sentinel flow")
        other = live.create_key()
        kms.create_alias(AliasName="alias/sentinel", TargetKeyId=key["KeyId"])
        context = {"purpose": "sentinel"}
        blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=self.plaintext, EncryptionContext=context)
        assert (
            kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=context)[
                "Plaintext"
            ]
            == self.plaintext
        )
        self._data_keys(key["KeyId"])
        moved = kms.re_encrypt(
            CiphertextBlob=blob["CiphertextBlob"],
            SourceEncryptionContext=context,
            DestinationKeyId=other["KeyId"],
        )
        assert kms.decrypt(CiphertextBlob=moved["CiphertextBlob"])["Plaintext"] == self.plaintext
        rnd = kms.generate_random(NumberOfBytes=32, CustomKeyStoreId=live.store_id)
        self.secrets["GenerateRandom output"] = rnd["Plaintext"]
        self._bad_inputs(key["KeyId"], blob["CiphertextBlob"])

    def _data_keys(self, key_id: str) -> None:
        for spec in ("AES_256", "AES_128"):
            out = self.kms.generate_data_key(KeyId=key_id, KeySpec=spec)
            self.secrets[f"data key {spec}"] = out["Plaintext"]
            self.kms.decrypt(CiphertextBlob=out["CiphertextBlob"])
        out = self.kms.generate_data_key(KeyId=key_id, NumberOfBytes=48)
        self.secrets["data key 48 bytes"] = out["Plaintext"]
        self.kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")

    def _bad_inputs(self, key_id: str, blob: bytes) -> None:
        kms, live = self.kms, self.live
        huge = self.plaintext * (4096 // len(self.plaintext) + 1)
        self.expect_error(lambda: kms.encrypt(KeyId=key_id, Plaintext=huge), "ValidationException")
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        self.expect_error(
            lambda: kms.decrypt(CiphertextBlob=tampered, EncryptionContext={"purpose": "sentinel"}),
            "InvalidCiphertextException",
        )
        self.expect_error(
            lambda: kms.decrypt(CiphertextBlob=self.plaintext), "InvalidCiphertextException"
        )
        self.expect_error(
            lambda: kms.update_custom_key_store(
                CustomKeyStoreId=live.store_id, KeyStorePassword=WRONG_PASSWORD
            ),
            "CustomKeyStoreInvalidStateException",
        )
        self.expect_error(
            lambda: kms.create_custom_key_store(
                CustomKeyStoreName="second",
                CloudHsmClusterId=live.env.cluster_id,
                TrustAnchorCertificate=live.env.pki.ca_cert_pem,
                KeyStorePassword=WRONG_PASSWORD,
            ),
            "CloudHsmClusterInUseException",
        )
        self.errors.append(_raw_encrypt_with_bad_signature(live, self.plaintext).decode())


def _leaks(haystacks: dict[str, bytes], secret_values: dict[str, bytes]) -> list[str]:
    found = []
    for where, data in haystacks.items():
        for name, secret in secret_values.items():
            for form in _forms(secret):
                if form in data:
                    found.append(f"{name} ({form[:12]!r}...) in {where}")
    return found


def test_no_secret_leaves_the_service(make_kms_env, caplog, tmp_path):
    env = make_kms_env(store=False)
    _set_token_pin(env, PASSWORD)
    log_file = tmp_path / "outside" / "server.log"
    log_file.parent.mkdir()
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.addFilter(_ServerSide())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    live = start_live(env)
    try:
        flow = Flow(live)
        flow.run()
        ctx = live.runtime.service.ctx
        rotated = ctx.password_of(ctx.store_row(live.store_id))
        if rotated != PASSWORD:  # the cloudhsm profile rotated it at connect: a secret too
            flow.secrets["kmsuser password set at connect"] = rotated.encode()
        metrics = live.get("/metrics")[1]
        health = live.get("/health")[1]
    finally:
        live.close()  # flushes the audit file and checkpoints the metadata WAL
        root.removeHandler(handler)
        handler.close()

    records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    assert any(r.name.startswith("hsmbridge") for r in records), "expected server-side logs"
    captured = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records
    ).encode()
    haystacks = {
        "captured log records": captured,
        "log file": log_file.read_bytes(),
        "error responses": "\n".join(flow.errors).encode(),
        "/metrics": metrics,
        "/health": health,
    }
    files = [p for p in Path(env.root).rglob("*") if p.is_file()]
    assert env.settings.audit_log in files
    assert env.settings.metadata_db in files
    haystacks |= {f"file {p.relative_to(env.root)}": p.read_bytes() for p in files}
    assert b"SENTINEL" not in haystacks[f"file {env.settings.audit_log.name}"]
    # The one expected hit: the credentials file is the service's input, not something it wrote.
    inputs = {f"AWS secret access key ({SECRET_KEY.encode()[:12]!r}...) in file credentials"}
    assert set(_leaks(haystacks, flow.secrets)) <= inputs
    assert _leaks(haystacks, {"AWS secret access key": SECRET_KEY.encode()}) == sorted(inputs)
    assert len(flow.secrets) >= 9  # the flow really captured its data keys and random bytes


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: s,
        lambda s: s.hex().encode(),
        lambda s: s.hex().upper().encode(),
        base64.b64encode,
        lambda s: base64.urlsafe_b64encode(s).rstrip(b"="),
    ],
)
def test_the_detector_finds_every_encoding(encode):
    secret = b"\xfb\xff" + secrets.token_bytes(30)
    found = _leaks({"a log line": b"prefix " + encode(secret) + b" suffix"}, {"key": secret})
    assert found
