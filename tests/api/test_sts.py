"""STS on the KMS endpoint: real boto3 `sts` and `kms` clients against a real server.

Most tests run the HTTP edge with the real STS service (IAM directory, policy engine, session
issuer) and a stand-in KMS table that records the RequestContext each call received; the last
ones run the production wiring (`http.compose.create_app`) over a fake-HSM environment.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from hsmbridge.bootstrap.sessions import load_or_create_session_key, session_key_path
from hsmbridge.http.app import create_asgi_app
from hsmbridge.http.server import ThreadedServer
from hsmbridge.http.sigv4 import SigV4Verifier
from hsmbridge.identity.credentials import load_principals
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.identity.sessions import SessionIssuer
from hsmbridge.protocol.sts import build_sts_operations
from hsmbridge.request import RequestContext
from hsmbridge.service.sts import StsService
from hsmbridge.trail.calls import ApiEvent
from tests.api.conftest import RawResponse, send
from tests.harness import ACCESS_KEY, SECRET_KEY, KmsEnv
from tests.live import Live, start_live

REGION = "us-east-1"
A = "111122223333"
B = "444455556666"
NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
KMS_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}

# name -> (access key, secret, principal ARN)
KEYS = {
    "alice": (
        "AKIASTSTESTALICE0001",
        "alice-secret-0000000000000000000000000000",
        f"arn:aws:iam::{A}:user/alice",
    ),
    "carol": (
        "AKIASTSTESTCAROL0001",
        "carol-secret-0000000000000000000000000000",
        f"arn:aws:iam::{A}:user/carol",
    ),
    "root": (
        "AKIASTSTESTROOT00001",
        "root-secret-00000000000000000000000000000",
        f"arn:aws:iam::{A}:root",
    ),
    "bob": (
        "AKIASTSTESTBOB000001",
        "bob-secret-000000000000000000000000000000",
        f"arn:aws:iam::{B}:user/bob",
    ),
    "dave": (
        "AKIASTSTESTDAVE00001",
        "dave-secret-00000000000000000000000000000",
        f"arn:aws:iam::{B}:user/dave",
    ),
}
ALICE_ID = "AIDASTSTESTALICE00001"


def _allow(action: str, resource: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": action, "Resource": resource}],
    }


def _trust(principal: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}
        ],
    }


def _user(account: str, name: str, user_id: str, *policies: dict[str, Any]) -> dict[str, Any]:
    return {
        "Path": "/",
        "UserName": name,
        "UserId": user_id,
        "Arn": f"arn:aws:iam::{account}:user/{name}",
        "UserPolicyList": [
            {"PolicyName": f"p{i}", "PolicyDocument": doc} for i, doc in enumerate(policies)
        ],
        "GroupList": [],
        "AttachedManagedPolicies": [],
    }


def _role(
    account: str, name: str, role_id: str, trust: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "Path": "/",
        "RoleName": name,
        "RoleId": role_id,
        "Arn": f"arn:aws:iam::{account}:role/{name}",
        "AssumeRolePolicyDocument": trust,
        "RolePolicyList": [{"PolicyName": "kms", "PolicyDocument": KMS_ALL}],
        "AttachedManagedPolicies": [],
        **extra,
    }


def role_arn(name: str, account: str = A) -> str:
    return f"arn:aws:iam::{account}:role/{name}"


def write_iam(directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    account_a = {
        "UserDetailList": [
            _user(A, "alice", ALICE_ID, _allow("sts:AssumeRole", role_arn("by-account"))),
            _user(A, "carol", "AIDASTSTESTCAROL00001"),
        ],
        "GroupDetailList": [],
        "RoleDetailList": [
            _role(A, "direct", "AROASTSTESTDIRECT0001", _trust(KEYS["alice"][2])),
            _role(A, "by-account", "AROASTSTESTBYACCT0001", _trust(f"arn:aws:iam::{A}:root")),
            _role(A, "cross", "AROASTSTESTCROSS00001", _trust(f"arn:aws:iam::{B}:root")),
            _role(
                A,
                "long",
                "AROASTSTESTLONG000001",
                _trust(KEYS["alice"][2]),
                MaxSessionDuration=7200,
            ),
            _role(A, "chained", "AROASTSTESTCHAIN00001", _trust(role_arn("direct"))),
        ],
        "Policies": [],
    }
    account_b = {
        "UserDetailList": [
            _user(B, "bob", "AIDASTSTESTBOB0000001", _allow("sts:AssumeRole", role_arn("cross"))),
            _user(B, "dave", "AIDASTSTESTDAVE000001"),
        ],
        "GroupDetailList": [],
        "RoleDetailList": [],
        "Policies": [],
    }
    for account, doc in ((A, account_a), (B, account_b)):
        path = directory / f"{account}.json"
        path.write_text(json.dumps(doc))
        path.chmod(0o600)


@dataclass
class World:
    server: ThreadedServer
    issuer: SessionIssuer
    now: list[datetime]  # the service clock, movable
    contexts: list[RequestContext] = field(default_factory=list)
    events: list[ApiEvent] = field(default_factory=list)

    def sts(self, who: str = "alice", *, validate: bool = True, **creds: str) -> Any:
        return _client("sts", self.server.endpoint_url, who, validate, **creds)

    def kms(self, who: str = "alice", **creds: str) -> Any:
        return _client("kms", self.server.endpoint_url, who, True, **creds)

    def advance(self, seconds: float) -> None:
        self.now[0] += timedelta(seconds=seconds)


def _client(service: str, url: str, who: str, validate: bool, **creds: str) -> Any:
    if not creds:
        akid, secret, _ = KEYS[who]
        creds = {"aws_access_key_id": akid, "aws_secret_access_key": secret}
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        config=Config(retries={"total_max_attempts": 1}, parameter_validation=validate),
        **creds,
    )


def session_creds(result: dict[str, Any]) -> dict[str, str]:
    c = result["Credentials"]
    return {
        "aws_access_key_id": c["AccessKeyId"],
        "aws_secret_access_key": c["SecretAccessKey"],
        "aws_session_token": c["SessionToken"],
    }


def _write_credentials(path: Path) -> Path:
    path.write_text(
        "".join(
            f"[{name}]\naws_access_key_id = {akid}\naws_secret_access_key = {secret}\n"
            f"principal_arn = {arn}\n\n"
            for name, (akid, secret, arn) in KEYS.items()
        )
    )
    path.chmod(0o600)
    return path


def _serve(
    root: Path, world_now: list[datetime], contexts: list[RequestContext], events: list[ApiEvent]
) -> tuple[ThreadedServer, SessionIssuer]:
    lock = threading.Lock()

    def record(ctx: RequestContext) -> None:
        with lock:
            contexts.append(ctx)

    def list_keys(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        record(ctx)
        return {"Keys": [], "Truncated": False}

    def describe_key(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
        record(ctx)
        return {"KeyMetadata": {"KeyId": params["KeyId"], "Arn": ctx.principal_arn}}

    issuer = SessionIssuer(load_or_create_session_key(root / "sts.key"))
    clock = lambda: world_now[0]  # noqa: E731
    service = StsService(
        IamDirectory(root / "iam", interval_s=0), issuer, lambda: clock().timestamp()
    )
    verifier = SigV4Verifier(
        load_principals(root / "credentials"), REGION, sessions=issuer, session_clock=clock
    )
    app = create_asgi_app(
        operations={"ListKeys": list_keys, "DescribeKey": describe_key},
        verifier=verifier,
        region=REGION,
        max_request_bytes=16_384,
        sts_operations=build_sts_operations(service),
        on_event=events.append,
        anonymous_account=A,
    )
    return ThreadedServer(app).start(), issuer


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sts")
    write_iam(root / "iam")
    _write_credentials(root / "credentials")
    return root


@pytest.fixture(scope="module")
def world(world_root: Path) -> Iterator[World]:
    now = [datetime.now(UTC).replace(microsecond=0)]
    contexts: list[RequestContext] = []
    events: list[ApiEvent] = []
    server, issuer = _serve(world_root, now, contexts, events)
    try:
        yield World(server, issuer, now, contexts, events)
    finally:
        server.stop()


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    err = exc.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Message"]


# --- AssumeRole, and the session on KMS --------------------------------------------------------


def test_assume_role_then_kms_with_the_session(world: World) -> None:
    result = world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="build-42")
    creds = result["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert len(creds["AccessKeyId"]) == 20
    assert len(creds["SecretAccessKey"]) == 40
    lifetime = creds["Expiration"] - world.now[0]
    assert timedelta(seconds=3599) <= lifetime <= timedelta(seconds=3600)
    session_arn = f"arn:aws:sts::{A}:assumed-role/direct/build-42"
    assert result["AssumedRoleUser"] == {
        "AssumedRoleId": "AROASTSTESTDIRECT0001:build-42",
        "Arn": session_arn,
    }
    assert "PackedPolicySize" not in result

    kms = world.kms(**session_creds(result))
    assert kms.list_keys()["Keys"] == []
    described = kms.describe_key(KeyId="alias/x")["KeyMetadata"]
    assert described["Arn"] == session_arn
    ctx = world.contexts[-1]
    assert ctx.principal_arn == session_arn
    assert ctx.account_id == A
    assert ctx.role_arn == role_arn("direct")
    assert ctx.session_policy is None
    assert ctx.source_ip == "127.0.0.1"
    assert ctx.secure_transport is False


def test_caller_identity_of_user_root_and_session(world: World) -> None:
    user = world.sts("alice").get_caller_identity()
    assert (user["UserId"], user["Account"], user["Arn"]) == (ALICE_ID, A, KEYS["alice"][2])
    root = world.sts("root").get_caller_identity()
    assert (root["UserId"], root["Account"], root["Arn"]) == (A, A, f"arn:aws:iam::{A}:root")
    session = world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="who")
    mine = world.sts(**session_creds(session)).get_caller_identity()
    assert mine["UserId"] == "AROASTSTESTDIRECT0001:who"
    assert mine["Arn"] == f"arn:aws:sts::{A}:assumed-role/direct/who"
    assert mine["Account"] == A


def test_trust_naming_the_account_needs_an_iam_allow(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts("carol").assume_role(RoleArn=role_arn("by-account"), RoleSessionName="s1")
    code, status, message = _code(exc)
    assert (code, status) == ("AccessDenied", 403)
    assert message.startswith(
        f"User: {KEYS['carol'][2]} is not authorized to perform: sts:AssumeRole on resource: "
        f"{role_arn('by-account')}"
    )
    ok = world.sts("alice").assume_role(RoleArn=role_arn("by-account"), RoleSessionName="s1")
    assert ok["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{A}:assumed-role/by-account/s1"


def test_trust_naming_another_user_denies(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts("carol").assume_role(RoleArn=role_arn("direct"), RoleSessionName="s1")
    assert _code(exc)[:2] == ("AccessDenied", 403)


def test_unknown_role_is_access_denied(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts().assume_role(RoleArn=role_arn("nope"), RoleSessionName="s1")
    code, status, message = _code(exc)
    assert (code, status) == ("AccessDenied", 403)
    assert role_arn("nope") in message


def test_cross_account_role(world: World) -> None:
    result = world.sts("bob").assume_role(RoleArn=role_arn("cross"), RoleSessionName="from-b")
    assert result["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{A}:assumed-role/cross/from-b"
    who = world.sts(**session_creds(result)).get_caller_identity()
    assert who["Account"] == A
    world.kms(**session_creds(result)).list_keys()
    assert world.contexts[-1].account_id == A
    # The trust names account B, but B's IAM must allow the caller too.
    with pytest.raises(ClientError) as exc:
        world.sts("dave").assume_role(RoleArn=role_arn("cross"), RoleSessionName="from-b")
    assert _code(exc)[:2] == ("AccessDenied", 403)
    # A role that trusts only its own account is closed to account B.
    with pytest.raises(ClientError) as exc:
        world.sts("bob").assume_role(RoleArn=role_arn("by-account"), RoleSessionName="x1")
    assert _code(exc)[:2] == ("AccessDenied", 403)


def test_role_chaining(world: World) -> None:
    first = world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="first")
    sts = world.sts(**session_creds(first))
    with pytest.raises(ClientError) as exc:
        sts.assume_role(RoleArn=role_arn("chained"), RoleSessionName="second", DurationSeconds=3601)
    # "chained" keeps its default MaxSessionDuration (3600): AWS's message for that limit.
    assert _code(exc)[0] == "ValidationError"
    second = sts.assume_role(RoleArn=role_arn("chained"), RoleSessionName="second")
    assert second["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{A}:assumed-role/chained/second"


# --- parameters ----------------------------------------------------------------------------------


def test_duration_bounds(world: World) -> None:
    sts = world.sts(validate=False)
    short = sts.assume_role(RoleArn=role_arn("direct"), RoleSessionName="d9", DurationSeconds=900)
    assert short["Credentials"]["Expiration"] - world.now[0] == timedelta(seconds=900)
    with pytest.raises(ClientError) as exc:
        sts.assume_role(RoleArn=role_arn("direct"), RoleSessionName="dd", DurationSeconds=3601)
    assert _code(exc) == (
        "ValidationError",
        400,
        "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
    )
    long = sts.assume_role(RoleArn=role_arn("long"), RoleSessionName="dd", DurationSeconds=7200)
    assert long["Credentials"]["Expiration"] - world.now[0] == timedelta(seconds=7200)
    with pytest.raises(ClientError) as exc:
        sts.assume_role(RoleArn=role_arn("direct"), RoleSessionName="dd", DurationSeconds=899)
    assert _code(exc) == (
        "ValidationError",
        400,
        "1 validation error detected: Value '899' at 'durationSeconds' failed to satisfy "
        "constraint: Member must have value greater than or equal to 900",
    )


@pytest.mark.parametrize(
    ("name", "constraint"),
    [
        ("a", "have length greater than or equal to 2"),
        ("x" * 65, "have length less than or equal to 64"),
        ("bad name", r"satisfy regular expression pattern: [\w+=,.@-]*"),
    ],
)
def test_role_session_name_is_validated(world: World, name: str, constraint: str) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts(validate=False).assume_role(RoleArn=role_arn("direct"), RoleSessionName=name)
    code, status, message = _code(exc)
    assert (code, status) == ("ValidationError", 400)
    assert message == (
        f"1 validation error detected: Value '{name}' at 'roleSessionName' failed to satisfy "
        f"constraint: Member must {constraint}"
    )


def test_session_policy_round_trips_in_the_token(world: World) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:ListKeys", "Resource": "*"}],
    }
    result = world.sts().assume_role(
        RoleArn=role_arn("direct"), RoleSessionName="narrow", Policy=json.dumps(policy, indent=2)
    )
    assert 0 < result["PackedPolicySize"] <= 100
    world.kms(**session_creds(result)).list_keys()
    ctx = world.contexts[-1]
    assert ctx.session_policy is not None
    assert json.loads(ctx.session_policy) == policy
    assert ctx.principal_arn == f"arn:aws:sts::{A}:assumed-role/direct/narrow"


@pytest.mark.parametrize("policy", ["{not json", '{"Version": "2012-10-17"}', "[]"])
def test_malformed_session_policy(world: World, policy: str) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="p1", Policy=policy)
    assert _code(exc)[:2] == ("MalformedPolicyDocument", 400)


# --- GetSessionToken -----------------------------------------------------------------------------


def test_get_session_token(world: World) -> None:
    result = world.sts("alice").get_session_token()
    assert result["Credentials"]["Expiration"] - world.now[0] == timedelta(seconds=43200)
    creds = session_creds(result)
    who = world.sts(**creds).get_caller_identity()
    assert (who["UserId"], who["Arn"]) == (ALICE_ID, KEYS["alice"][2])
    world.kms(**creds).list_keys()
    ctx = world.contexts[-1]
    assert (ctx.principal_arn, ctx.role_arn) == (KEYS["alice"][2], None)
    # Session credentials cannot make more sessions.
    with pytest.raises(ClientError) as exc:
        world.sts(**creds).get_session_token()
    assert _code(exc) == (
        "AccessDenied",
        403,
        "Cannot call GetSessionToken with session credentials",
    )
    with pytest.raises(ClientError) as exc:
        world.sts(validate=False).get_session_token(DurationSeconds=129_601)
    assert _code(exc)[:2] == ("ValidationError", 400)


# --- bad credentials -----------------------------------------------------------------------------


def test_expired_session(world: World) -> None:
    result = world.sts().assume_role(
        RoleArn=role_arn("direct"), RoleSessionName="brief", DurationSeconds=900
    )
    creds = session_creds(result)
    kms, sts = world.kms(**creds), world.sts(**creds)
    kms.list_keys()
    world.advance(901)
    try:
        with pytest.raises(ClientError) as exc:
            kms.list_keys()
        assert _code(exc) == (
            "ExpiredTokenException",
            400,
            "The security token included in the request is expired",
        )
        with pytest.raises(ClientError) as exc:
            sts.get_caller_identity()
        assert _code(exc)[:2] == ("ExpiredToken", 403)
    finally:
        world.advance(-901)


def test_missing_or_wrong_token(world: World) -> None:
    one = session_creds(world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="one"))
    two = session_creds(world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="two"))
    without = {k: v for k, v in one.items() if k != "aws_session_token"}
    swapped = {**one, "aws_session_token": two["aws_session_token"]}
    garbage = {**one, "aws_session_token": "not-a-token"}
    for creds in (without, swapped, garbage):
        with pytest.raises(ClientError) as exc:
            world.kms(**creds).list_keys()
        assert _code(exc)[:2] == ("UnrecognizedClientException", 400)
        with pytest.raises(ClientError) as exc:
            world.sts(**creds).get_caller_identity()
        assert _code(exc)[:2] == ("InvalidClientTokenId", 403)
    wrong_secret = {**one, "aws_secret_access_key": "x" * 40}
    with pytest.raises(ClientError) as exc:
        world.kms(**wrong_secret).list_keys()
    assert _code(exc)[0] == "InvalidSignatureException"
    with pytest.raises(ClientError) as exc:
        world.sts(**wrong_secret).get_caller_identity()
    assert _code(exc)[:2] == ("SignatureDoesNotMatch", 403)


def test_session_token_with_long_term_keys(world: World) -> None:
    token = session_creds(world.sts().get_session_token())["aws_session_token"]
    akid, secret, _ = KEYS["alice"]
    creds = {"aws_access_key_id": akid, "aws_secret_access_key": secret, "aws_session_token": token}
    with pytest.raises(ClientError) as exc:
        world.kms(**creds).list_keys()
    assert _code(exc)[0] == "UnrecognizedClientException"
    with pytest.raises(ClientError) as exc:
        world.sts(**creds).get_caller_identity()
    assert _code(exc)[:2] == ("InvalidClientTokenId", 403)


# --- the wire ------------------------------------------------------------------------------------


def _raw_sts(world: World, body: str, *, service: str = "sts") -> RawResponse:
    akid, secret, _ = KEYS["alice"]
    request = AWSRequest(
        method="POST",
        url=world.server.endpoint_url + "/",
        data=body.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    SigV4Auth(Credentials(akid, secret), service, REGION).add_auth(request)
    return send(request)


def _error(resp: RawResponse) -> tuple[str, str, str]:
    root = ElementTree.fromstring(resp.body)  # noqa: S314 - our own server
    assert root.tag == f"{NS}ErrorResponse"
    error = root.find(f"{NS}Error")
    assert error is not None
    assert root.findtext(f"{NS}RequestId") == resp.headers["x-amzn-requestid"]
    return (
        error.findtext(f"{NS}Type") or "",
        error.findtext(f"{NS}Code") or "",
        error.findtext(f"{NS}Message") or "",
    )


def test_xml_shapes(world: World) -> None:
    resp = _raw_sts(world, "Action=GetCallerIdentity&Version=2011-06-15")
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/xml"
    root = ElementTree.fromstring(resp.body)  # noqa: S314 - our own server
    assert root.tag == f"{NS}GetCallerIdentityResponse"
    assert root.findtext(f"{NS}GetCallerIdentityResult/{NS}Arn") == KEYS["alice"][2]
    assert root.findtext(f"{NS}ResponseMetadata/{NS}RequestId") == resp.headers["x-amzn-requestid"]

    unknown = _raw_sts(world, "Action=GetFederationToken&Version=2011-06-15&Name=x")
    assert unknown.status == 400
    assert _error(unknown)[:2] == ("Sender", "InvalidAction")
    old = _raw_sts(world, "Action=GetCallerIdentity&Version=2010-01-01")
    assert _error(old)[1] == "InvalidAction"
    none = _raw_sts(world, "Version=2011-06-15")
    assert _error(none)[1] == "MissingAction"
    # STS requests are signed for `sts`, not `kms`.
    kms_scoped = _raw_sts(world, "Action=GetCallerIdentity&Version=2011-06-15", service="kms")
    assert kms_scoped.status == 403
    assert _error(kms_scoped)[1:] == (
        "SignatureDoesNotMatch",
        "Credential should be scoped to correct service: 'sts'. ",
    )


def test_unsupported_parameters_are_refused(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.sts().assume_role(
            RoleArn=role_arn("direct"),
            RoleSessionName="s1",
            PolicyArns=[{"arn": "arn:aws:iam::aws:policy/AdministratorAccess"}],
        )
    assert _code(exc)[0] == "ValidationError"


def test_one_audit_event_per_call_without_secrets(world: World) -> None:
    before = len(world.events)
    result = world.sts().assume_role(
        RoleArn=role_arn("direct"), RoleSessionName="audited", ExternalId="ext-1"
    )
    with pytest.raises(ClientError):
        world.sts("carol").assume_role(RoleArn=role_arn("direct"), RoleSessionName="nope")
    events = world.events[before:]
    assert [e.operation for e in events] == ["AssumeRole", "AssumeRole"]
    ok, denied = events
    assert (ok.status, ok.error_code, ok.principal_arn) == (200, None, KEYS["alice"][2])
    assert ok.params_redacted == {
        "RoleArn": role_arn("direct"),
        "RoleSessionName": "audited",
        "ExternalId": "ext-1",
    }
    assert (denied.status, denied.error_code) == (403, "AccessDenied")
    assert ok.additional is not None
    assert ok.additional["eventSource"] == "sts.amazonaws.com"
    secrets = (result["Credentials"]["SecretAccessKey"], result["Credentials"]["SessionToken"])
    for event in events:
        assert not any(s in repr(event) for s in secrets)


def test_a_second_server_accepts_sessions_of_the_first(world: World, world_root: Path) -> None:
    creds = session_creds(
        world.sts().assume_role(RoleArn=role_arn("direct"), RoleSessionName="portable")
    )
    contexts: list[RequestContext] = []
    other, _ = _serve(world_root, world.now, contexts, [])
    try:
        kms = _client("kms", other.endpoint_url, "", True, **creds)
        kms.list_keys()
        assert contexts[-1].principal_arn == f"arn:aws:sts::{A}:assumed-role/direct/portable"
    finally:
        other.stop()


# --- the production wiring -----------------------------------------------------------------------


def _add_role(env: KmsEnv) -> None:
    path = env.settings.iam_dir / "111122223333.json"
    doc = json.loads(path.read_text())
    tester = doc["UserDetailList"][0]["Arn"]
    doc["RoleDetailList"].append(_role(A, "app", "AROASTSTESTAPP000001", _trust(tester)))
    path.write_text(json.dumps(doc))


def test_live_assume_role_survives_a_restart(make_fake_env: Callable[..., KmsEnv]) -> None:
    env = make_fake_env(store=False)
    _add_role(env)
    assert env.connector is not None
    live: Live = start_live(env, connector=env.connector(env.settings))
    try:
        live.create_store()
        live.connect()
        key = live.create_key()
        sts = boto3.client(
            "sts",
            endpoint_url=live.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        result = sts.assume_role(RoleArn=role_arn("app"), RoleSessionName="live")
        creds = session_creds(result)
        session_kms = boto3.client("kms", endpoint_url=live.url, region_name=REGION, **creds)
        assert session_kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyId"] == key["KeyId"]
        assert session_key_path(env.settings).stat().st_mode & 0o777 == 0o600
        names = [(e["eventName"], e["principalArn"]) for e in live.events()]
        assert ("AssumeRole", "arn:aws:iam::111122223333:user/tester") in names
        session_arn = f"arn:aws:sts::{A}:assumed-role/app/live"
        assert ("DescribeKey", session_arn) in names
        text = live.audit_path.read_text()
        assert creds["aws_session_token"] not in text
        assert creds["aws_secret_access_key"] not in text
    finally:
        live.close()
    again = start_live(env, connector=env.connector(env.settings))
    try:
        session_kms = boto3.client("kms", endpoint_url=again.url, region_name=REGION, **creds)
        assert session_kms.list_keys()["Keys"]
    finally:
        again.close()
