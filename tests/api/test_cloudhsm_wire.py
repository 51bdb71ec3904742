"""The CloudHSM v2 API on the wire: raw awsJson 1.1 and raw Smithy RPC v2 CBOR requests signed
with botocore's SigV4Auth, and boto3's own `cloudhsmv2` client, against a real server running
`protocol.cloudhsm`'s table over a stand-in service (the real one is in tests/e2e)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
import cbor2
import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hsmbridge.errors import (
    AccessDeniedException,
    CloudHsmResourceNotFoundException,
    DependencyTimeoutException,
    UnrecognizedClientException,
)
from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.protocol import cloudhsm
from hsmbridge.protocol.cloudhsm import build_cloudhsm_endpoint, unavailable_endpoint
from hsmbridge.request import RequestContext
from hsmbridge.trail.calls import ApiEvent
from tests.api.conftest import (
    ACCESS_KEY,
    LEAK_SENTINEL,
    PRINCIPAL_ARN,
    REGION,
    SECRET_KEY,
    write_credentials,
)

CLUSTER = "cluster-abcdefghijk"
HSM = "hsm-abcdefghijk"
CREATED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
DENIED_CLUSTER = "cluster-deniedcluster"
BROKEN_CLUSTER = "cluster-brokencluster"
JSON_TYPE = "application/x-amz-json-1.1"
_POOL = urllib3.PoolManager()


@dataclass
class StandIn:
    """What the table passes to the service, and canned answers."""

    calls: list[tuple[str, RequestContext, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, name: str, caller: RequestContext, **kw: Any) -> None:
        with self.lock:
            self.calls.append((name, caller, kw))
        if kw.get("cluster_id") == DENIED_CLUSTER or kw.get("resource_id") == DENIED_CLUSTER:
            raise AccessDeniedException(f"{caller.principal_arn} may not do {name}")
        if kw.get("resource_id") == "cluster-missingcluster":
            raise CloudHsmResourceNotFoundException("Cluster cluster-missingcluster does not exist")
        if kw.get("cluster_id") == BROKEN_CLUSTER:
            raise RuntimeError(f"inventory exploded: {LEAK_SENTINEL}")

    def describe_clusters(self, caller, *, filters, max_results, next_token):
        self._record(
            "DescribeClusters", caller, filters=filters, max_results=max_results, token=next_token
        )
        cluster = {
            "ClusterId": CLUSTER,
            "CreateTimestamp": CREATED,
            "State": "ACTIVE",
            "SubnetMapping": {"us-east-1a": "subnet-1", "us-east-1b": "subnet-2"},
            "Hsms": [_hsm("us-east-1a")],
            "SourceBackupId": None,  # absent members are left out on the wire
        }
        return [cluster], ("next-page" if max_results == 1 else None)

    def create_hsm(self, caller, cluster_id, availability_zone, ip_address):
        self._record(
            "CreateHsm", caller, cluster_id=cluster_id, az=availability_zone, ip=ip_address
        )
        return _hsm(availability_zone, state="CREATE_IN_PROGRESS")

    def delete_hsm(self, caller, cluster_id, *, hsm_id, eni_id, eni_ip):
        self._record("DeleteHsm", caller, cluster_id=cluster_id, hsm_id=hsm_id, eni_ip=eni_ip)
        return hsm_id or HSM

    def list_tags(self, caller, resource_id, *, next_token, max_results):
        self._record("ListTags", caller, resource_id=resource_id, max_results=max_results)
        return [{"Key": "team", "Value": "crypto"}], None

    def tag_resource(self, caller, resource_id, tags):
        self._record("TagResource", caller, resource_id=resource_id, tags=tags)

    def untag_resource(self, caller, resource_id, keys):
        self._record("UntagResource", caller, resource_id=resource_id, keys=keys)


def _hsm(az: str, state: str = "ACTIVE") -> dict[str, Any]:
    return {
        "AvailabilityZone": az,
        "ClusterId": CLUSTER,
        "SubnetId": "subnet-1",
        "EniId": "eni-0123456789abcdef0",
        "EniIp": "10.0.0.5",
        "HsmId": HSM,
        "State": state,
    }


@dataclass
class Wire:
    url: str
    stand: StandIn
    events: list[ApiEvent]


def _serve(tmp_path_factory, endpoint) -> Iterator[tuple[str, list[ApiEvent]]]:
    creds = write_credentials(tmp_path_factory.mktemp("cloudhsm") / "credentials")
    events: list[ApiEvent] = []
    app = create_asgi_app(
        operations={},
        verifier=SigV4Verifier(load_principals(creds), REGION),
        region=REGION,
        max_request_bytes=4096,
        cloudhsm_endpoint=endpoint,
        on_event=events.append,
    )
    with ThreadedServer(app) as srv:
        yield srv.endpoint_url, events


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    stand = StandIn()
    for url, events in _serve(tmp_path_factory, build_cloudhsm_endpoint(stand)):
        yield Wire(url, stand, events)


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def cbor(self) -> Any:
        return cbor2.loads(self.body)


def _send(request: AWSRequest, body: bytes | None = None) -> Raw:
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    resp = _POOL.request(
        "POST",
        request.url,
        body=request.body if body is None else body,
        headers=headers,
        retries=False,
        timeout=10,
    )
    return Raw(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.data)


def _sign(request: AWSRequest, service: str = "cloudhsm") -> AWSRequest:
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), service, REGION).add_auth(request)
    return request


def json_call(url: str, operation: str, params: Any, *, service: str = "cloudhsm", **kw) -> Raw:
    body = json.dumps(params).encode()
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": f"BaldrApiService.{operation}"}
    request = _sign(AWSRequest("POST", url + "/", data=body, headers=headers), service)
    return _send(request, **kw)


def cbor_call(
    url: str,
    operation: str,
    params: Any,
    *,
    service: str = "cloudhsm",
    path: str | None = None,
    protocol_header: str | None = "rpc-v2-cbor",
    **kw: Any,
) -> Raw:
    body = params if isinstance(params, bytes) else cbor2.dumps(params)
    headers = {"Content-Type": "application/cbor", "Accept": "application/cbor"}
    if protocol_header is not None:
        headers["smithy-protocol"] = protocol_header
    target = path or f"/service/BaldrApiService/operation/{operation}"
    request = _sign(AWSRequest("POST", url + target, data=body, headers=headers), service)
    return _send(request, **kw)


def _json_error(raw: Raw) -> tuple[int, str, str]:
    assert raw.headers["content-type"] == JSON_TYPE
    doc = raw.json
    return raw.status, doc["__type"], doc["message"]


def _cbor_error(raw: Raw) -> tuple[int, str, str]:
    assert raw.headers["content-type"] == "application/cbor"
    assert raw.headers["smithy-protocol"] == "rpc-v2-cbor"
    doc = raw.cbor
    return raw.status, doc["__type"], doc["message"]


def client(url: str) -> Any:
    return boto3.client(
        "cloudhsmv2",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


# --- success in both protocols -------------------------------------------------------------


def test_json_describe_clusters(wire: Wire) -> None:
    raw = json_call(wire.url, "DescribeClusters", {"Filters": {"clusterIds": [CLUSTER]}})
    assert raw.status == 200, raw.body
    assert raw.headers["content-type"] == JSON_TYPE
    assert raw.headers["x-amzn-requestid"]
    doc = raw.json
    (cluster,) = doc["Clusters"]
    assert cluster["CreateTimestamp"] == CREATED.timestamp()  # epoch seconds, a JSON number
    assert "SourceBackupId" not in cluster
    assert "NextToken" not in doc
    name, ctx, kw = wire.stand.calls[-1]
    assert name == "DescribeClusters"
    assert kw["filters"] == {"clusterIds": [CLUSTER]}
    assert ctx.principal_arn == PRINCIPAL_ARN


def test_cbor_describe_clusters(wire: Wire) -> None:
    raw = cbor_call(wire.url, "DescribeClusters", {"MaxResults": 1})
    assert raw.status == 200, raw.body
    assert raw.headers["content-type"] == "application/cbor"
    assert raw.headers["smithy-protocol"] == "rpc-v2-cbor"
    # Timestamps are tag 1 over epoch seconds.
    assert b"\xc1" in raw.body
    doc = raw.cbor
    assert doc["Clusters"][0]["CreateTimestamp"] == CREATED
    assert doc["NextToken"] == "next-page"
    assert wire.stand.calls[-1][2]["max_results"] == 1


def test_cbor_empty_body_means_no_parameters(wire: Wire) -> None:
    raw = cbor_call(wire.url, "DescribeClusters", b"")
    assert raw.status == 200, raw.body
    assert raw.cbor["Clusters"][0]["ClusterId"] == CLUSTER


def test_boto3_client_speaks_to_the_table(wire: Wire) -> None:
    hsm = client(wire.url)
    assert hsm.meta.service_model.protocol == "smithy-rpc-v2-cbor"  # what botocore picks
    cluster = hsm.describe_clusters()["Clusters"][0]
    assert cluster["CreateTimestamp"] == CREATED
    assert cluster["Hsms"][0]["State"] == "ACTIVE"
    created = hsm.create_hsm(ClusterId=CLUSTER, AvailabilityZone="us-east-1b")["Hsm"]
    assert created["State"] == "CREATE_IN_PROGRESS"
    assert wire.stand.calls[-1][2] == {"cluster_id": CLUSTER, "az": "us-east-1b", "ip": None}
    assert hsm.delete_hsm(ClusterId=CLUSTER, HsmId=HSM)["HsmId"] == HSM
    assert hsm.list_tags(ResourceId=CLUSTER)["TagList"] == [{"Key": "team", "Value": "crypto"}]
    hsm.tag_resource(ResourceId=CLUSTER, TagList=[{"Key": "équipe", "Value": "crypto 1"}])
    assert wire.stand.calls[-1][2]["tags"] == [{"Key": "équipe", "Value": "crypto 1"}]
    hsm.untag_resource(ResourceId=CLUSTER, TagKeyList=["équipe"])
    assert wire.stand.calls[-1][2]["keys"] == ["équipe"]


def test_json_tag_and_untag(wire: Wire) -> None:
    raw = json_call(
        wire.url, "TagResource", {"ResourceId": CLUSTER, "TagList": [{"Key": "a", "Value": ""}]}
    )
    assert (raw.status, raw.json) == (200, {})
    raw = json_call(wire.url, "UntagResource", {"ResourceId": CLUSTER, "TagKeyList": ["a"]})
    assert (raw.status, raw.json) == (200, {})


# --- errors, each in its own protocol --------------------------------------------------------


def test_service_errors_in_both_protocols(wire: Wire) -> None:
    params = {"ResourceId": "cluster-missingcluster"}
    assert _json_error(json_call(wire.url, "ListTags", params))[:2] == (
        400,
        "CloudHsmResourceNotFoundException",
    )
    assert _cbor_error(cbor_call(wire.url, "ListTags", params))[:2] == (
        400,
        "CloudHsmResourceNotFoundException",
    )


def test_access_denied_is_renamed(wire: Wire) -> None:
    params = {"ResourceId": DENIED_CLUSTER}
    status, code, message = _json_error(json_call(wire.url, "ListTags", params))
    assert (status, code) == (400, "CloudHsmAccessDeniedException")
    assert PRINCIPAL_ARN in message
    status, code, _ = _cbor_error(cbor_call(wire.url, "ListTags", params))
    assert (status, code) == (400, "CloudHsmAccessDeniedException")
    with pytest.raises(ClientError) as info:
        client(wire.url).list_tags(ResourceId=DENIED_CLUSTER)
    assert info.value.response["Error"]["Code"] == "CloudHsmAccessDeniedException"


def test_internal_failure_hides_the_detail(wire: Wire) -> None:
    params = {"ClusterId": BROKEN_CLUSTER, "AvailabilityZone": "us-east-1a"}
    for raw, decode in (
        (json_call(wire.url, "CreateHsm", params), _json_error),
        (cbor_call(wire.url, "CreateHsm", params), _cbor_error),
    ):
        status, code, message = decode(raw)
        assert (status, code) == (500, "CloudHsmInternalFailureException")
        assert LEAK_SENTINEL not in message
        assert LEAK_SENTINEL.encode() not in raw.body


def test_validation_errors(wire: Wire) -> None:
    before = len(wire.stand.calls)
    status, code, message = _json_error(
        json_call(wire.url, "CreateHsm", {"ClusterId": "nope", "AvailabilityZone": "mars-1a"})
    )
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    assert message.startswith("2 validation errors detected: ")
    assert "at 'clusterId' failed to satisfy constraint" in message
    status, code, message = _cbor_error(cbor_call(wire.url, "DeleteHsm", {}))
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    assert "Value null at 'clusterId'" in message
    # A wrong type is bad input too (not a SerializationException: the body did decode).
    status, code, _ = _cbor_error(cbor_call(wire.url, "DescribeClusters", {"MaxResults": "1"}))
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    status, code, message = _json_error(json_call(wire.url, "DescribeClusters", {"MaxResults": 26}))
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    assert "less than or equal to 25" in message
    # Tag keys follow the model's Unicode classes: letters yes, '!' no.
    status, code, message = _json_error(
        json_call(
            wire.url,
            "TagResource",
            {"ResourceId": CLUSTER, "TagList": [{"Key": "a!", "Value": ""}]},
        )
    )
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    assert "tagList.1.member.key" in message
    assert len(wire.stand.calls) == before  # nothing reached the service


def test_undecodable_bodies(wire: Wire) -> None:
    status, code, _ = _cbor_error(cbor_call(wire.url, "DescribeClusters", b"\xa1"))
    assert (status, code) == (400, "SerializationException")
    status, code, _ = _json_error(json_call(wire.url, "DescribeClusters", {}, body=b"{nope"))
    # The body no longer matches its signature, which is checked before anything decodes it.
    assert (status, code) == (400, "InvalidSignatureException")
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": "BaldrApiService.DescribeClusters"}
    signed = _sign(AWSRequest("POST", wire.url + "/", data=b"{nope", headers=headers), "cloudhsm")
    status, code, _ = _json_error(_send(signed))
    assert (status, code) == (400, "SerializationException")
    deep = b"\x81" * 30 + b"\xa0"
    status, code, _ = _cbor_error(cbor_call(wire.url, "DescribeClusters", deep))
    assert (status, code) == (400, "SerializationException")
    # A CBOR tag the protocol has no use for (here a regular expression, tag 35).
    tagged = cbor2.dumps({"NextToken": cbor2.CBORTag(35, "a+")})
    status, code, _ = _cbor_error(cbor_call(wire.url, "DescribeClusters", tagged))
    assert (status, code) == (400, "SerializationException")


def test_unsupported_and_unknown_operations(wire: Wire) -> None:
    # A real cloudhsmv2 operation hsmbridge does not serve: the model's bad-request error.
    status, code, message = _json_error(json_call(wire.url, "CreateCluster", {}))
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    assert "CreateCluster is not supported" in message
    status, code, _ = _cbor_error(cbor_call(wire.url, "DeleteBackup", {"BackupId": "x"}))
    assert (status, code) == (400, "CloudHsmInvalidRequestException")
    with pytest.raises(ClientError) as info:
        client(wire.url).describe_backups()
    assert info.value.response["Error"]["Code"] == "CloudHsmInvalidRequestException"
    # No such operation at all: AWS's front end answers UnknownOperationException.
    assert _json_error(json_call(wire.url, "LaunchRockets", {}))[:2] == (
        400,
        "UnknownOperationException",
    )
    assert _cbor_error(cbor_call(wire.url, "LaunchRockets", {}))[:2] == (
        400,
        "UnknownOperationException",
    )
    other = "/service/TrentService/operation/ListKeys"
    assert _cbor_error(cbor_call(wire.url, "", {}, path=other))[1] == "UnknownOperationException"
    # Without the smithy-protocol header the request is not RPC v2 CBOR.
    no_header = cbor_call(wire.url, "DescribeClusters", {}, protocol_header=None)
    assert _cbor_error(no_header)[:2] == (400, "UnknownOperationException")


def test_bad_signatures(wire: Wire) -> None:
    # Signed for KMS, sent to CloudHSM.
    status, code, message = _json_error(json_call(wire.url, "DescribeClusters", {}, service="kms"))
    assert (status, code) == (400, "InvalidSignatureException")
    assert "'cloudhsm'" in message
    status, code, _ = _cbor_error(cbor_call(wire.url, "DescribeClusters", {}, service="kms"))
    assert (status, code) == (400, "InvalidSignatureException")
    # A body changed after signing.
    tampered = cbor_call(wire.url, "DescribeClusters", {}, body=cbor2.dumps({"MaxResults": 2}))
    assert _cbor_error(tampered)[:2] == (400, "InvalidSignatureException")
    # The operation is in the signed path: a captured request cannot be replayed as another.
    request = _sign(
        AWSRequest(
            "POST",
            wire.url + "/service/BaldrApiService/operation/ListTags",
            data=cbor2.dumps({"ResourceId": CLUSTER}),
            headers={"Content-Type": "application/cbor", "smithy-protocol": "rpc-v2-cbor"},
        )
    )
    request.url = wire.url + "/service/BaldrApiService/operation/UntagResource"
    assert _cbor_error(_send(request))[:2] == (400, "InvalidSignatureException")
    # No signature at all.
    raw = _send(
        AWSRequest(
            "POST",
            wire.url + "/",
            data=b"{}",
            headers={"Content-Type": JSON_TYPE, "X-Amz-Target": "BaldrApiService.ListTags"},
        )
    )
    assert _json_error(raw)[:2] == (400, "MissingAuthenticationTokenException")


def test_every_call_leaves_one_event(wire: Wire) -> None:
    before = len(wire.events)
    json_call(wire.url, "ListTags", {"ResourceId": CLUSTER})
    cbor_call(wire.url, "ListTags", {"ResourceId": DENIED_CLUSTER})
    cbor_call(wire.url, "CreateCluster", {})
    deadline = datetime.now(UTC).timestamp() + 5
    while len(wire.events) < before + 3 and datetime.now(UTC).timestamp() < deadline:
        threading.Event().wait(0.01)
    ok, denied, unsupported = wire.events[before : before + 3]
    for event in (ok, denied, unsupported):
        assert event.additional is not None
        assert event.additional["eventSource"] == cloudhsm.EVENT_SOURCE
    assert (ok.operation, ok.status, ok.error_code) == ("ListTags", 200, None)
    assert ok.params_redacted == {"ResourceId": CLUSTER}
    assert ok.principal_arn == PRINCIPAL_ARN
    assert (denied.error_code, denied.status) == ("CloudHsmAccessDeniedException", 400)
    assert (unsupported.operation, unsupported.error_code) == (
        "CreateCluster",
        "CloudHsmInvalidRequestException",
    )


def test_kms_requests_are_unaffected(wire: Wire) -> None:
    body = b"{}"
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": "TrentService.ListKeys"}
    raw = _send(_sign(AWSRequest("POST", wire.url + "/", data=body, headers=headers), "kms"))
    # This app serves no KMS operation: KMS's own error, in KMS's JSON.
    assert raw.json["__type"] == "UnsupportedOperationException"


def test_unavailable_endpoint_refuses_every_call(tmp_path_factory) -> None:
    reason = "the inventory is the real CloudHSM API: call it instead"
    for url, _ in _serve(tmp_path_factory, unavailable_endpoint(reason)):
        status, code, message = _json_error(json_call(url, "DescribeClusters", {}))
        assert (status, code, message) == (400, "CloudHsmInvalidRequestException", reason)
        status, code, message = _cbor_error(cbor_call(url, "CreateHsm", {}))
        assert (status, code, message) == (400, "CloudHsmInvalidRequestException", reason)
        with pytest.raises(ClientError) as info:
            client(url).describe_clusters()
        assert info.value.response["Error"]["Code"] == "CloudHsmInvalidRequestException"
        assert info.value.response["Error"]["Message"] == reason


def test_without_cloudhsm_the_paths_are_unknown(tmp_path_factory) -> None:
    for url, _ in _serve(tmp_path_factory, None):
        raw = cbor_call(url, "DescribeClusters", {})
        assert raw.status == 400
        assert raw.json["__type"] == "UnknownOperationException"


def test_code_table() -> None:
    assert cloudhsm.cloudhsm_code(AccessDeniedException("x")) == (
        "CloudHsmAccessDeniedException",
        400,
    )
    assert cloudhsm.cloudhsm_code(CloudHsmResourceNotFoundException("x")) == (
        "CloudHsmResourceNotFoundException",
        400,
    )
    assert cloudhsm.cloudhsm_code(DependencyTimeoutException("x")) == (
        "CloudHsmInternalFailureException",
        500,
    )
    assert cloudhsm.cloudhsm_code(UnrecognizedClientException("x")) == (
        "UnrecognizedClientException",
        400,
    )
