"""Hardening (security review F5, F6, F10): SigV4's 5-minute clock window, lone UTF-16 surrogates
and non-UTF-8 bodies refused at decoding, one Authorization header per request, the ARN partition
checked, and `alias/aws/` reserved in any letter case. Raw signed requests through a live server
over a fake HSM (the real service and metadata store, no SoftHSM)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import cbor2
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmbridge.errors import InvalidAliasNameException, InvalidSignatureException
from hsmbridge.http.sigv4 import MAX_SKEW, SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.service.aliases import check_alias_name
from tests.api.conftest import RawResponse, send
from tests.harness import ACCESS_KEY, ACCOUNT, REGION, SECRET_KEY, KmsEnv
from tests.live import Live, served_with_store

KMS_JSON = "application/x-amz-json-1.1"
LONE = "\\ud800"  # the JSON escape of an unpaired high surrogate, as the wire carries it
STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


@pytest.fixture
def live_fake(make_fake_env: Callable[..., KmsEnv]) -> Iterator[Live]:
    """A live server over a fake-HSM environment with a connected store."""
    env = make_fake_env(store=False)
    assert env.connector is not None
    with served_with_store(env, connector=env.connector(env.settings)) as live:
        yield live


def _request(
    url: str, body: bytes, headers: dict[str, str], *, service: str = "kms", path: str = "/"
) -> AWSRequest:
    request = AWSRequest(method="POST", url=url + path, data=body, headers=headers)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), service, REGION).add_auth(request)
    return request


def kms_call(live: Live, operation: str, body: bytes | str) -> RawResponse:
    raw = body.encode() if isinstance(body, str) else body
    headers = {"Content-Type": KMS_JSON, "X-Amz-Target": f"TrentService.{operation}"}
    return send(_request(live.url, raw, headers))


def _kms_error(resp: RawResponse) -> tuple[int, str]:
    return resp.status, json.loads(resp.body)["__type"]


# --- F5: SigV4 clock skew ------------------------------------------------------------------------


@pytest.fixture
def verifier(tmp_path: Any) -> SigV4Verifier:
    from tests.api.conftest import write_credentials

    return SigV4Verifier(load_principals(write_credentials(tmp_path / "creds")), REGION)


def _dated_headers(amz_date: str) -> dict[str, str]:
    # The date is checked before the signature, so a placeholder signature is enough here.
    return {
        "host": "127.0.0.1:8080",
        "x-amz-date": amz_date,
        "authorization": (
            f"AWS4-HMAC-SHA256 Credential=AKIAHSMBRIDGETEST001/{amz_date[:8]}/{REGION}/kms/"
            "aws4_request, SignedHeaders=host;x-amz-date, Signature=" + "0" * 64
        ),
    }


def test_skew_window_is_five_minutes_with_aws_texts(verifier: SigV4Verifier) -> None:
    assert MAX_SKEW.total_seconds() == 300
    now = datetime(2024, 1, 1, 0, 10, tzinfo=UTC)
    with pytest.raises(InvalidSignatureException) as info:
        verifier.verify("POST", "/", "", _dated_headers("20240101T000000Z"), b"{}", now=now)
    assert info.value.message == (
        "Signature expired: 20240101T000000Z is now earlier than 20240101T000500Z"
        " (20240101T001000Z - 5 min.)"
    )
    early = datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
    with pytest.raises(InvalidSignatureException) as info:
        verifier.verify("POST", "/", "", _dated_headers("20240101T001000Z"), b"{}", now=early)
    assert info.value.message == (
        "Signature not yet current: 20240101T001000Z is still later than 20240101T000500Z"
        " (20240101T000000Z + 5 min.)"
    )


def test_six_minutes_of_skew_is_refused(verifier: SigV4Verifier) -> None:
    now = datetime(2024, 1, 1, 0, 6, 1, tzinfo=UTC)
    with pytest.raises(InvalidSignatureException, match="Signature expired"):
        verifier.verify("POST", "/", "", _dated_headers("20240101T000000Z"), b"{}", now=now)


# --- F6: lone UTF-16 surrogates ---------------------------------------------------------------


def test_lone_surrogates_are_serialization_errors_not_500(live_fake: Live) -> None:
    live = live_fake
    key_id = live.create_key()["KeyId"]
    cases = {
        "Encrypt": (
            f'{{"KeyId":"{key_id}","Plaintext":"aGk=","EncryptionContext":{{"k":"v{LONE}"}}}}'
        ),
        "Encrypt (context key)": (
            f'{{"KeyId":"{key_id}","Plaintext":"aGk=","EncryptionContext":{{"{LONE}":"v"}}}}'
        ),
        "CreateAlias": f'{{"AliasName":"alias/x{LONE}","TargetKeyId":"{key_id}"}}',
        "UpdateKeyDescription": f'{{"KeyId":"{key_id}","Description":"d{LONE}"}}',
        "CreateKey": f'{{"Description":"d{LONE}"}}',
        "TagResource": f'{{"KeyId":"{key_id}","Tags":[{{"TagKey":"k","TagValue":"{LONE}"}}]}}',
        "CreateCustomKeyStore": (
            f'{{"CustomKeyStoreName":"s{LONE}","CloudHsmClusterId":"{live.env.cluster_id}",'
            f'"TrustAnchorCertificate":{json.dumps(live.env.pki.ca_cert_pem)},'
            f'"KeyStorePassword":"{live.env.password}"}}'
        ),
        "UpdateCustomKeyStore": (
            f'{{"CustomKeyStoreId":"{live.store_id}","NewCustomKeyStoreName":"n\\udfff"}}'
        ),
    }
    for case, body in cases.items():
        resp = kms_call(live, case.split(" ")[0], body)
        assert _kms_error(resp) == (400, "SerializationException"), (case, resp.body)
    # Nothing was changed by the refused calls; a valid pair of escapes is still accepted.
    described = live.kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert described["Description"] == ""
    assert live.kms.list_aliases(KeyId=key_id)["Aliases"] == []
    ok = kms_call(
        live, "UpdateKeyDescription", f'{{"KeyId":"{key_id}","Description":"\\ud83d\\ude00"}}'
    )
    assert ok.status == 200, ok.body
    assert live.kms.describe_key(KeyId=key_id)["KeyMetadata"]["Description"] == "\U0001f600"


def test_sts_form_with_an_encoded_surrogate_is_malformed(live_fake: Live) -> None:
    body = b"Action=GetCallerIdentity&Version=2011-06-15&Extra=%ED%A0%80"
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    resp = send(_request(live_fake.url, body, headers, service="sts"))
    assert resp.status == 400, resp.body
    root = ElementTree.fromstring(resp.body)  # noqa: S314 - our own server
    assert root.findtext(f"{STS_NS}Error/{STS_NS}Code") == "MalformedQueryString"


def test_cloudhsm_json_and_cbor_refuse_lone_surrogates(live_fake: Live) -> None:
    url = live_fake.url
    headers = {
        "Content-Type": KMS_JSON,
        "X-Amz-Target": "BaldrApiService.DescribeClusters",
    }
    body = f'{{"Filters":{{"clusterIds":["{LONE}"]}}}}'.encode()
    resp = send(_request(url, body, headers, service="cloudhsm"))
    assert resp.status == 400, resp.body
    assert json.loads(resp.body)["__type"] == "SerializationException"
    # CBOR text strings are UTF-8, which cannot encode a surrogate: refused as undecodable.
    prefix = cbor2.dumps({"Filters": {"clusterIds": ["x"]}})[:-2]
    cbor_body = prefix + bytes([0x63, 0xED, 0xA0, 0x80])
    cbor_headers = {
        "Content-Type": "application/cbor",
        "Accept": "application/cbor",
        "smithy-protocol": "rpc-v2-cbor",
    }
    path = "/service/BaldrApiService/operation/DescribeClusters"
    resp = send(_request(url, cbor_body, cbor_headers, service="cloudhsm", path=path))
    assert resp.status == 400, resp.body
    assert cbor2.loads(resp.body)["__type"] == "SerializationException"


# --- F10 ---------------------------------------------------------------------------------------


def test_a_second_authorization_header_is_refused(live_fake: Live) -> None:
    request = _request(
        live_fake.url, b"{}", {"Content-Type": KMS_JSON, "X-Amz-Target": "TrentService.ListKeys"}
    )
    assert send(request).status == 200  # the request is valid with its one header
    parts = urlsplit(live_fake.url)
    for first, second in (
        ("AWS4-HMAC-SHA256 garbage", request.headers["Authorization"]),
        (request.headers["Authorization"], request.headers["Authorization"]),
    ):
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            conn.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.items():
                if name.lower() != "authorization":
                    conn.putheader(name, value)
            conn.putheader("Host", parts.netloc)
            conn.putheader("Authorization", first)
            conn.putheader("Authorization", second)
            conn.putheader("Content-Length", "2")
            conn.endheaders(b"{}")
            resp = conn.getresponse()
            status, doc = resp.status, json.loads(resp.read())
        finally:
            conn.close()
        assert status == 400, doc
        assert doc["__type"] in {"IncompleteSignatureException", "InvalidSignatureException"}


def test_an_arn_of_another_partition_names_no_key(live_fake: Live) -> None:
    live = live_fake
    key = live.create_key()
    live.kms.create_alias(AliasName="alias/part", TargetKeyId=key["KeyId"])
    assert key["Arn"].startswith("arn:aws:kms:")
    assert kms_call(live, "DescribeKey", json.dumps({"KeyId": key["Arn"]})).status == 200
    for partition in ("aws-cn", "aws-us-gov"):
        for arn in (
            key["Arn"].replace("arn:aws:", f"arn:{partition}:"),
            f"arn:{partition}:kms:{REGION}:{ACCOUNT}:alias/part",
        ):
            resp = kms_call(live, "DescribeKey", json.dumps({"KeyId": arn}))
            assert _kms_error(resp) == (400, "NotFoundException"), (arn, resp.body)
            assert f"arn:{partition}:" in json.loads(resp.body)["message"]
    wrong = key["Arn"].replace("arn:aws:", "arn:aws-cn:")
    resp = kms_call(live, "Encrypt", json.dumps({"KeyId": wrong, "Plaintext": "aGk="}))
    assert _kms_error(resp) == (400, "NotFoundException")


@pytest.mark.parametrize("name", ["alias/AWS/x", "alias/Aws/x", "alias/aWs/x"])
def test_reserved_alias_prefix_in_any_case(name: str) -> None:
    with pytest.raises(InvalidAliasNameException) as lower:
        check_alias_name("alias/aws/x")
    with pytest.raises(InvalidAliasNameException) as mixed:
        check_alias_name(name)
    assert mixed.value.message == lower.value.message.replace("alias/aws/x", name, 1)


def test_reserved_alias_prefix_over_the_wire(live_fake: Live) -> None:
    key_id = live_fake.create_key()["KeyId"]
    for name in ("alias/aws/x", "alias/AWS/x"):
        resp = kms_call(
            live_fake, "CreateAlias", json.dumps({"AliasName": name, "TargetKeyId": key_id})
        )
        assert _kms_error(resp) == (400, "InvalidAliasNameException"), (name, resp.body)
    assert live_fake.kms.list_aliases(KeyId=key_id)["Aliases"] == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_body_that_is_not_utf8_json_is_a_serialization_error(
    live_fake: Live, encoding: str
) -> None:
    assert kms_call(live_fake, "ListKeys", b'{"Limit": 5}').status == 200
    resp = kms_call(live_fake, "ListKeys", '{"Limit": 5}'.encode(encoding))
    assert _kms_error(resp) == (400, "SerializationException"), resp.body
