"""The CloudHSM v2 API (`cloudhsmv2`, signing name `cloudhsm`) on the KMS endpoint, in both
protocols its botocore model lists.

* awsJson 1.1: `POST /`, `X-Amz-Target: BaldrApiService.NAME`, `application/x-amz-json-1.1`,
  errors `{"__type": ..., "message": ...}` and timestamps as epoch-second numbers, as for KMS.
* Smithy RPC v2 CBOR: `POST /service/BaldrApiService/operation/NAME`, `application/cbor` and
  `smithy-protocol: rpc-v2-cbor` both ways, errors a CBOR map with `__type` and `message`,
  timestamps CBOR tag 1 (epoch seconds). botocore prefers this one (the model lists it first),
  so boto3 and the aws-cli speak CBOR; other SDKs may pick JSON.

Owns: routing a request to an operation (`json_operation`, `cbor_operation`,
`CloudHsmEndpoint.handler`), decoding (`parse_cbor`; JSON bodies use `http.app.parse_json`),
validation against botocore's cloudhsmv2 model (`validate`: bad input is
CloudHsmInvalidRequestException), the operation table (`build_cloudhsm_endpoint` over the
service; `unavailable_endpoint` when the inventory is the real CloudHSM API), the response
encodings and the error mapping (`cloudhsm_code`: the service's CloudHsm*Exception pass through,
AccessDenied becomes CloudHsmAccessDeniedException, the common AWS authentication errors keep
their names). It is the only place cloudhsmv2 wire names are spelled.
Must not import uvicorn or any web framework, pkcs11, or the backend.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import cbor2

from hsmbridge.errors import (
    AccessDeniedException,
    DependencyTimeoutException,
    KmsError,
    SerializationException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.protocol.errors import (
    CONTENT_TYPE as JSON_CONTENT_TYPE,
)
from hsmbridge.protocol.errors import (
    GENERIC_INTERNAL_MESSAGE,
    Headers,
    encode_json,
    json_headers,
)
from hsmbridge.protocol.validation import ModelValidator, validator
from hsmbridge.request import RequestContext

logger = logging.getLogger(__name__)

SERVICE_MODEL: Final = "cloudhsmv2"
SIGNING_SERVICE: Final = "cloudhsm"
EVENT_SOURCE: Final = "cloudhsm.amazonaws.com"
TARGET_PREFIX: Final = "BaldrApiService."
CBOR_PATH_PREFIX: Final = "/service/"
CBOR_SERVICE: Final = "BaldrApiService"
CBOR_CONTENT_TYPE: Final = "application/cbor"
SMITHY_PROTOCOL: Final = "rpc-v2-cbor"
MAX_CBOR_DEPTH: Final = 20  # cloudhsmv2 inputs nest at most 3 deep (Filters: map of lists)

Handler = Callable[[RequestContext, dict[str, Any]], dict[str, Any]]

INVALID_REQUEST: Final = "CloudHsmInvalidRequestException"
ACCESS_DENIED: Final = "CloudHsmAccessDeniedException"
INTERNAL_FAILURE: Final = "CloudHsmInternalFailureException"
SERVICE_ERROR: Final = "CloudHsmServiceException"

# hsmbridge's generic error names -> cloudhsmv2's. Codes already in the model (the service's
# CloudHsm*Exception) pass through unchanged, and so do the common AWS errors below.
_RENAMED: Final[Mapping[str, str]] = {
    AccessDeniedException.code: ACCESS_DENIED,
    ValidationException.code: INVALID_REQUEST,
    UnsupportedOperationException.code: INVALID_REQUEST,
    "NotFoundException": "CloudHsmResourceNotFoundException",
    "TagException": "CloudHsmTagException",
    "LimitExceededException": "CloudHsmResourceLimitExceededException",
}
# Sent by AWS's front end for every service (authentication, protocol): not cloudhsmv2 shapes.
_COMMON: Final = frozenset(
    {
        "MissingAuthenticationTokenException",
        "IncompleteSignatureException",
        "InvalidSignatureException",
        "UnrecognizedClientException",
        "ExpiredTokenException",
        "UnknownOperationException",
        "SerializationException",
        "ThrottlingException",
    }
)


def _model() -> ModelValidator:
    return validator(SERVICE_MODEL)


def operation_names() -> frozenset[str]:
    """Every cloudhsmv2 operation, to tell 'not served here' from 'no such operation'."""
    return _model().operation_names


def _model_errors() -> frozenset[str]:
    shapes = _model().model.shape_names
    return frozenset(name for name in shapes if name.startswith("CloudHsm"))


def cloudhsm_code(error: KmsError) -> tuple[str, int]:
    """cloudhsmv2's error code and HTTP status for an hsmbridge error (400 client, 500 fault)."""
    code = error.code
    if error.fault or code == DependencyTimeoutException.code:
        # The model's only server fault; botocore retries it.
        return (code if code in _model_errors() else INTERNAL_FAILURE), 500
    if code in _model_errors() or code in _COMMON:
        return code, 400
    return _RENAMED.get(code, SERVICE_ERROR), 400


# --- the operation table ---------------------------------------------------------------------


class CloudHsmApi(Protocol):
    """What the table needs of `service.cloudhsm.CloudHsmService` (structural, so this layer
    names no service class): one method per operation, the caller's context first."""

    def describe_clusters(
        self,
        caller: RequestContext,
        *,
        filters: dict[str, list[str]] | None,
        max_results: int | None,
        next_token: str | None,
    ) -> tuple[Sequence[Mapping[str, Any]], str | None]: ...

    def create_hsm(
        self,
        caller: RequestContext,
        cluster_id: str,
        availability_zone: str,
        ip_address: str | None,
    ) -> Mapping[str, Any]: ...

    def delete_hsm(
        self,
        caller: RequestContext,
        cluster_id: str,
        *,
        hsm_id: str | None,
        eni_id: str | None,
        eni_ip: str | None,
    ) -> str: ...

    def list_tags(
        self,
        caller: RequestContext,
        resource_id: str,
        *,
        next_token: str | None,
        max_results: int | None,
    ) -> tuple[Sequence[Mapping[str, Any]], str | None]: ...

    def tag_resource(
        self, caller: RequestContext, resource_id: str, tags: list[dict[str, str]]
    ) -> None: ...

    def untag_resource(self, caller: RequestContext, resource_id: str, keys: list[str]) -> None: ...


@dataclass(frozen=True)
class CloudHsmEndpoint:
    """The operations served, or (`unavailable`) why none is: every cloudhsmv2 call then answers
    CloudHsmInvalidRequestException with that reason."""

    operations: Mapping[str, Handler]
    unavailable: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.operations) - operation_names())
        if unknown:
            raise ValueError(f"not cloudhsmv2 operations: {', '.join(unknown)}")

    def handler(self, operation: str) -> Handler:
        """The operation's handler; `operation` must be a model name (see `json_operation`)."""
        if self.unavailable is not None:
            raise UnsupportedOperationException(self.unavailable)
        found = self.operations.get(operation)
        if found is None:
            raise UnsupportedOperationException(
                f"{operation} is not supported by this CloudHSM endpoint (hsmbridge)"
            )
        return found


def _page(items_name: str, items: Sequence[Mapping[str, Any]], token: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {items_name: list(items)}
    if token is not None:
        out["NextToken"] = token
    return out


def build_cloudhsm_endpoint(service: CloudHsmApi) -> CloudHsmEndpoint:
    """Operation name -> handler over the service; params arrive validated (`validate`)."""

    def describe_clusters(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        clusters, token = service.describe_clusters(
            ctx,
            filters=p.get("Filters"),
            max_results=p.get("MaxResults"),
            next_token=p.get("NextToken"),
        )
        return _page("Clusters", clusters, token)

    def create_hsm(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        hsm = service.create_hsm(ctx, p["ClusterId"], p["AvailabilityZone"], p.get("IpAddress"))
        return {"Hsm": hsm}

    def delete_hsm(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        hsm_id = service.delete_hsm(
            ctx,
            p["ClusterId"],
            hsm_id=p.get("HsmId"),
            eni_id=p.get("EniId"),
            eni_ip=p.get("EniIp"),
        )
        return {"HsmId": hsm_id}

    def list_tags(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        tags, token = service.list_tags(
            ctx,
            p["ResourceId"],
            next_token=p.get("NextToken"),
            max_results=p.get("MaxResults"),
        )
        return _page("TagList", tags, token)

    def tag_resource(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        service.tag_resource(ctx, p["ResourceId"], p["TagList"])
        return {}

    def untag_resource(ctx: RequestContext, p: dict[str, Any]) -> dict[str, Any]:
        service.untag_resource(ctx, p["ResourceId"], p["TagKeyList"])
        return {}

    return CloudHsmEndpoint(
        {
            "DescribeClusters": describe_clusters,
            "CreateHsm": create_hsm,
            "DeleteHsm": delete_hsm,
            "ListTags": list_tags,
            "TagResource": tag_resource,
            "UntagResource": untag_resource,
        }
    )


def unavailable_endpoint(reason: str) -> CloudHsmEndpoint:
    """An endpoint refusing every cloudhsmv2 call with `reason`."""
    return CloudHsmEndpoint({}, unavailable=reason)


# --- requests --------------------------------------------------------------------------------


def json_operation(target: str) -> str:
    """The operation an `X-Amz-Target` names (`BaldrApiService.NAME`), or UnknownOperation."""
    operation = target.removeprefix(TARGET_PREFIX)
    if not target.startswith(TARGET_PREFIX) or operation not in operation_names():
        raise UnknownOperationException(f"Unknown operation {target!r}")
    return operation


def cbor_operation(path: str) -> str:
    """The operation an RPC v2 path names (`/service/BaldrApiService/operation/NAME`)."""
    parts = path.split("/")
    if (
        len(parts) != 5
        or parts[:2] != ["", "service"]
        or parts[2] != CBOR_SERVICE
        or parts[3] != "operation"
        or parts[4] not in operation_names()
    ):
        raise UnknownOperationException(f"Unknown operation {path!r}")
    return parts[4]


def check_json_headers(headers: Mapping[str, str]) -> None:
    """awsJson 1.1 requests say so in their Content-Type (AWS's front end: UnknownOperation)."""
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != JSON_CONTENT_TYPE:
        raise UnknownOperationException(f"Content-Type must be {JSON_CONTENT_TYPE}")


def check_cbor_headers(headers: Mapping[str, str], body: bytes) -> None:
    """RPC v2 CBOR requests carry `smithy-protocol: rpc-v2-cbor` and, with a body, a CBOR
    Content-Type; anything else is not this protocol (AWS's front end: UnknownOperation)."""
    if headers.get("smithy-protocol") != SMITHY_PROTOCOL:
        raise UnknownOperationException(f"The smithy-protocol header must be {SMITHY_PROTOCOL}")
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if body and content_type != CBOR_CONTENT_TYPE:
        raise UnknownOperationException(f"Content-Type must be {CBOR_CONTENT_TYPE}")


_PLAIN: Final = (str, int, float, bool, bytes, datetime, type(None))


def _check_plain(obj: Any) -> None:
    # Only what RPC v2 CBOR maps to model shapes; the depth bound also ends a cyclic document
    # (CBOR's shared-reference tags can build one).
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_CBOR_DEPTH:
            raise SerializationException(f"CBOR nesting exceeds {MAX_CBOR_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif not isinstance(node, _PLAIN):
            raise SerializationException(
                f"Unexpected CBOR data item in the request: {type(node).__name__}"
            )


def parse_cbor(body: bytes) -> Any:
    """The request document; an empty body means no parameters."""
    if not body:
        return {}
    try:
        obj = cbor2.loads(body, max_depth=MAX_CBOR_DEPTH)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise SerializationException("Request body is not valid CBOR") from None
    _check_plain(obj)
    return obj


def validate(operation: str, params: Any) -> dict[str, Any]:
    """Check params against the cloudhsmv2 model. Every shape error, a wrong type included, is
    a ValidationException (on the wire CloudHsmInvalidRequestException, the model's name for
    bad input); SerializationException stays for bodies that do not decode at all."""
    try:
        return _model().validate_input(operation, params)
    except SerializationException as exc:
        raise ValidationException(exc.message) from None


# --- responses -------------------------------------------------------------------------------


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value


def encode_json_result(result: Mapping[str, Any]) -> bytes:
    return encode_json(_without_none(result))


def encode_cbor(result: Mapping[str, Any]) -> bytes:
    """CBOR body: timestamps as tag 1 epoch seconds (naive ones read as UTC)."""
    return cbor2.dumps(_without_none(result), datetime_as_timestamp=True, timezone=UTC)


def cbor_headers(request_id: str, body_len: int) -> Headers:
    return [
        (b"content-type", CBOR_CONTENT_TYPE.encode()),
        (b"content-length", str(body_len).encode()),
        (b"x-amzn-requestid", request_id.encode()),
        (b"smithy-protocol", SMITHY_PROTOCOL.encode()),
    ]


def _error(exc: BaseException, request_id: str) -> tuple[str, int, str]:
    if isinstance(exc, KmsError):
        code, status = cloudhsm_code(exc)
        return code, status, exc.message
    logger.error("unhandled error in request %s", request_id, exc_info=exc)
    return INTERNAL_FAILURE, 500, GENERIC_INTERNAL_MESSAGE


def json_error_response(exc: BaseException, request_id: str) -> tuple[int, Headers, bytes, str]:
    """Status, headers, body and cloudhsmv2 error code for an awsJson request's failure.

    WARNING: a non-hsmbridge error is logged with its traceback and answered generically."""
    code, status, message = _error(exc, request_id)
    body = encode_json({"__type": code, "message": message})
    return status, json_headers(request_id, len(body)), body, code


def cbor_error_response(exc: BaseException, request_id: str) -> tuple[int, Headers, bytes, str]:
    """The same for an RPC v2 CBOR request: a CBOR map with `__type` and `message`."""
    code, status, message = _error(exc, request_id)
    body = cbor2.dumps({"__type": code, "message": message})
    return status, cbor_headers(request_id, len(body)), body, code


# --- audit -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def audit_params(operation: str | None, params: Any) -> dict[str, Any]:
    """The request's parameters as the audit trail may carry them (JSON-safe, CBOR included)."""
    redacted = _model().redact_params(operation, params)
    out: dict[str, Any] = _jsonable(redacted)
    return out
