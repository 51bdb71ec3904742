"""STS's Query protocol on the KMS endpoint: form-encoded requests in, XML out.

Owns: parsing the form body (`parse_form`, `action_of`), input validation with AWS's wording
(`1 validation error detected: Value ... at 'roleSessionName' failed to satisfy constraint: ...`),
the table of supported STS operations (`build_sts_operations`: one entry per operation over
`service.sts.StsService`), the XML of results (`encode_result`, in the shape botocore's `query`
parser reads: `<ActionResponse><ActionResult>...</ActionResult><ResponseMetadata>`) and of
errors (`sts_error_response`: `<ErrorResponse><Error><Type/><Code/><Message/></Error>`), with the
STS name and status of every hsmbridge error (`sts_code`). It is the only place STS wire names
are spelled.
Must not import uvicorn or any web framework, pkcs11, or the backend.
WARNING: results carry secret access keys and session tokens; they are encoded here and never
logged. Audit parameters go through `redact_sts_params`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Final
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from hsmbridge.errors import (
    AccessDeniedException,
    ClientError,
    DependencyTimeoutException,
    ExpiredTokenException,
    IncompleteSignatureException,
    InvalidClientTokenIdException,
    InvalidSignatureException,
    KmsError,
    MalformedPolicyDocumentException,
    MalformedPolicyDocumentStsException,
    MissingAuthenticationTokenException,
    SerializationException,
    UnknownOperationException,
    UnrecognizedClientException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.identity.sessions import Caller, TemporaryCredentials
from hsmbridge.protocol.errors import GENERIC_INTERNAL_MESSAGE, Headers
from hsmbridge.request import RequestContext
from hsmbridge.service.sts import StsService
from hsmbridge.trail.events import REDACTED

logger = logging.getLogger(__name__)

FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
XML_CONTENT_TYPE: Final = "text/xml"
API_VERSION: Final = "2011-06-15"
XML_NAMESPACE: Final = "https://sts.amazonaws.com/doc/2011-06-15/"
EVENT_SOURCE: Final = "sts.amazonaws.com"
SIGNING_SERVICE: Final = "sts"

# Result elements: (name, value) in wire order; a value is text, a number, a time or elements.
Value = str | int | datetime | Sequence[tuple[str, "Value"]]
Elements = list[tuple[str, Value]]
Params = dict[str, str]
StsHandler = Callable[[Caller, RequestContext, Params], Elements]


class MissingActionException(ClientError):  # noqa: N818 - named like errors.py's
    code = "MissingAction"


# hsmbridge's error classes (KMS-named) -> STS's code and HTTP status. The authentication codes
# are the common AWS errors STS sends (403, as AWS does); the rest are 400 client errors.
_STS_CODES: Final[Mapping[type[KmsError], tuple[str, int]]] = {
    AccessDeniedException: ("AccessDenied", 403),
    InvalidSignatureException: ("SignatureDoesNotMatch", 403),
    UnrecognizedClientException: ("InvalidClientTokenId", 403),
    InvalidClientTokenIdException: ("InvalidClientTokenId", 403),
    ExpiredTokenException: ("ExpiredToken", 403),
    MissingAuthenticationTokenException: ("MissingAuthenticationToken", 403),
    IncompleteSignatureException: ("IncompleteSignature", 400),
    ValidationException: ("ValidationError", 400),
    MalformedPolicyDocumentStsException: ("MalformedPolicyDocument", 400),
    MalformedPolicyDocumentException: ("MalformedPolicyDocument", 400),
    UnknownOperationException: ("InvalidAction", 400),
    UnsupportedOperationException: ("InvalidAction", 400),
    SerializationException: ("MalformedQueryString", 400),
    MissingActionException: ("MissingAction", 400),
    DependencyTimeoutException: ("ServiceUnavailable", 503),
}


def sts_code(error: KmsError) -> tuple[str, int]:
    """STS's error code and HTTP status for an hsmbridge error."""
    for cls in type(error).__mro__:
        found = _STS_CODES.get(cls)
        if found is not None:
            return found
    if error.fault:
        return "InternalFailure", 500
    return error.code.removesuffix("Exception"), 400


# --- requests ------------------------------------------------------------------------------------


def parse_form(body: bytes) -> Params:
    """The form parameters of a Query request (a repeated name keeps its last value).

    Percent-escapes must decode as UTF-8 too (`%ED%A0%80`, a UTF-16 surrogate, does not): the
    default would replace them with U+FFFD and act on a value the caller never sent."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise SerializationException("The request body is not a valid query string") from None
    return dict(pairs)


def action_of(params: Mapping[str, str], operations: Mapping[str, StsHandler]) -> str:
    action = params.get("Action")
    if not action:
        raise MissingActionException("Missing Action")
    version = params.get("Version")
    if action not in operations or version != API_VERSION:
        raise UnknownOperationException(
            f"Could not find operation {action} for version {version or 'NO_VERSION_SPECIFIED'}"
        )
    return action


def _wire_name(member: str) -> str:
    return member[:1].lower() + member[1:]


class _Validator:
    """AWS's `1 validation error detected: ...` for the members an operation reads."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.errors: list[str] = []

    def _fail(self, value: str | None, member: str, constraint: str) -> None:
        shown = "null" if value is None else f"'{value}'"
        self.errors.append(
            f"Value {shown} at '{_wire_name(member)}' failed to satisfy constraint: "
            f"Member must {constraint}"
        )

    def string(
        self,
        member: str,
        *,
        required: bool = False,
        min_len: int = 1,
        max_len: int,
        pattern: str | None = None,
        shown: bool = True,
    ) -> str | None:
        value = self.params.get(member)
        if value is None:
            if required:
                self._fail(None, member, "not be null")
            return None
        display = value if shown else None
        if len(value) < min_len:
            self._fail(display, member, f"have length greater than or equal to {min_len}")
        elif len(value) > max_len:
            self._fail(display, member, f"have length less than or equal to {max_len}")
        elif pattern is not None and re.fullmatch(pattern, value) is None:
            self._fail(display, member, f"satisfy regular expression pattern: {pattern}")
        return value

    def integer(self, member: str, *, low: int, high: int) -> int | None:
        value = self.params.get(member)
        if value is None:
            return None
        try:
            number = int(value, 10)
        except ValueError:
            self.errors.append(f"Value '{value}' for parameter {member} is invalid.")
            return None
        if number < low:
            self._fail(value, member, f"have value greater than or equal to {low}")
        elif number > high:
            self._fail(value, member, f"have value less than or equal to {high}")
        return number

    def unsupported(self, *prefixes: str) -> None:
        for name in self.params:
            if name.startswith(prefixes):
                member = name.split(".", 1)[0]
                raise ValidationException(
                    f"{member} is not supported by this STS endpoint (hsmbridge)"
                )

    def check(self) -> None:
        if self.errors:
            count = len(self.errors)
            noun = "error" if count == 1 else "errors"
            raise ValidationException(
                f"{count} validation {noun} detected: {'; '.join(self.errors)}"
            )


_NAME_PATTERN: Final = r"[\w+=,.@-]*"
_POLICY_PATTERN: Final = r"[\u0009\u000A\u000D\u0020-\u00FF]+"


# --- operations ----------------------------------------------------------------------------------


def _credentials(creds: TemporaryCredentials) -> Elements:
    return [
        ("AccessKeyId", creds.access_key_id),
        ("SecretAccessKey", creds.secret_access_key),
        ("SessionToken", creds.session_token),
        ("Expiration", creds.expiration),
    ]


def build_sts_operations(service: StsService) -> dict[str, StsHandler]:
    """Action name -> handler; each validates its members, calls the service, shapes the XML."""

    def assume_role(caller: Caller, context: RequestContext, params: Params) -> Elements:
        v = _Validator(params)
        # Managed session policies and session tags change what a session may do; refusing
        # them is safer than ignoring them.
        v.unsupported("PolicyArns", "Tags", "TransitiveTagKeys", "ProvidedContexts")
        role_arn = v.string("RoleArn", required=True, min_len=20, max_len=2048)
        session_name = v.string(
            "RoleSessionName", required=True, min_len=2, max_len=64, pattern=_NAME_PATTERN
        )
        duration = v.integer("DurationSeconds", low=900, high=43_200)
        policy = v.string("Policy", max_len=2048, pattern=_POLICY_PATTERN, shown=False)
        v.string("ExternalId", min_len=2, max_len=1224, pattern=r"[\w+=,.@:/-]*")
        source_identity = v.string("SourceIdentity", min_len=2, max_len=64, pattern=_NAME_PATTERN)
        v.check()
        assert role_arn is not None
        assert session_name is not None
        result = service.assume_role(
            caller,
            context,
            role_arn=role_arn,
            session_name=session_name,
            duration_s=duration,
            policy=policy,
            source_identity=source_identity,
        )
        out: Elements = [
            ("Credentials", _credentials(result.credentials)),
            ("AssumedRoleUser", [("AssumedRoleId", result.assumed_role_id), ("Arn", result.arn)]),
        ]
        if result.packed_policy_size is not None:
            out.append(("PackedPolicySize", result.packed_policy_size))
        if result.source_identity is not None:
            out.append(("SourceIdentity", result.source_identity))
        return out

    def get_session_token(caller: Caller, context: RequestContext, params: Params) -> Elements:
        v = _Validator(params)
        duration = v.integer("DurationSeconds", low=900, high=129_600)
        v.check()  # SerialNumber and TokenCode (MFA) are accepted and not checked
        return [("Credentials", _credentials(service.get_session_token(caller, duration)))]

    def get_caller_identity(caller: Caller, context: RequestContext, params: Params) -> Elements:
        identity = service.get_caller_identity(caller)
        return [("UserId", identity.user_id), ("Account", identity.account), ("Arn", identity.arn)]

    return {
        "AssumeRole": assume_role,
        "GetSessionToken": get_session_token,
        "GetCallerIdentity": get_caller_identity,
    }


# --- responses -----------------------------------------------------------------------------------


def _xml_value(value: Value) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, int):
        return str(value)
    return "".join(f"<{name}>{_xml_value(child)}</{name}>" for name, child in value)


def encode_result(action: str, result: Elements, request_id: str) -> bytes:
    """`<ActionResponse xmlns=...><ActionResult>...</ActionResult><ResponseMetadata>...`."""
    return (
        f'<{action}Response xmlns="{XML_NAMESPACE}">'
        f"<{action}Result>{_xml_value(result)}</{action}Result>"
        f"<ResponseMetadata><RequestId>{escape(request_id)}</RequestId></ResponseMetadata>"
        f"</{action}Response>\n"
    ).encode()


def xml_headers(request_id: str, body_len: int) -> Headers:
    return [
        (b"content-type", XML_CONTENT_TYPE.encode()),
        (b"content-length", str(body_len).encode()),
        (b"x-amzn-requestid", request_id.encode()),
    ]


def sts_error_response(exc: BaseException, request_id: str) -> tuple[int, Headers, bytes, str]:
    """Status, headers, body and STS error code for any exception raised serving an STS call.

    WARNING: a non-hsmbridge error is logged with its traceback and answered generically.
    """
    if isinstance(exc, KmsError):
        code, status = sts_code(exc)
        message = exc.message
    else:
        logger.error("unhandled error in request %s", request_id, exc_info=exc)
        code, status, message = "InternalFailure", 500, GENERIC_INTERNAL_MESSAGE
    kind = "Receiver" if status >= 500 else "Sender"
    body = (
        f'<ErrorResponse xmlns="{XML_NAMESPACE}">'
        f"<Error><Type>{kind}</Type><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"</Error><RequestId>{escape(request_id)}</RequestId></ErrorResponse>\n"
    ).encode()
    return status, xml_headers(request_id, len(body)), body, code


_HIDDEN_PARAMS: Final = frozenset({"TokenCode"})  # an MFA code is a credential
_PROTOCOL_PARAMS: Final = frozenset({"Action", "Version"})


def redact_sts_params(params: Mapping[str, str] | None) -> dict[str, str]:
    """The request's parameters as the audit trail may carry them."""
    if not params:
        return {}
    return {
        name: REDACTED if name in _HIDDEN_PARAMS else value
        for name, value in params.items()
        if name not in _PROTOCOL_PARAMS
    }
