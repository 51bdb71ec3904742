"""The one place a KmsError becomes an HTTP response, plus the JSON body encoding all responses use.

Owns: the status table (`STATUS_BY_CODE`), `error_response` (status, headers, body for any
exception) and `encode_json` (wire JSON: bytes as base64, datetimes as epoch seconds).
Must not import: uvicorn or any web framework (this module deals in plain bytes and tuples),
pkcs11, or anything in hsmbridge below `errors`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import orjson

from hsmbridge.errors import (
    CloudHsmInternalFailureException,
    DependencyTimeoutException,
    KeyUnavailableException,
    KmsError,
    KMSInternalException,
)

logger = logging.getLogger(__name__)

CONTENT_TYPE: Final = "application/x-amz-json-1.1"
GENERIC_INTERNAL_MESSAGE: Final = "We encountered an internal error. Please try again."

# Status per error code. botocore (legacy and standard retry modes alike) retries HTTP 500, 502,
# 503 and 504 and the throttling error codes, and never retries any other 4xx. So the status is
# how we tell an SDK "try again": only server faults where a retry can succeed get a 5xx.
#   KMSInternalException      500  model fault=server; a transient internal failure is retried.
#   KeyUnavailableException   500  model fault=server; e.g. a CloudHSM key not yet on two HSMs.
#   DependencyTimeoutException 503 model fault=server; the HSM is busy or unreachable. 503 (not
#                                  500) matches the model's httpError and reads "come back later".
# Every other code is a client fault and gets 400, as real KMS sends: a retry of
# a validation, key-state, policy or signature error cannot succeed. ThrottlingException is 400
# too; botocore retries it by its code, not its status.
STATUS_BY_CODE: Final[Mapping[str, int]] = {
    KMSInternalException.code: 500,
    KeyUnavailableException.code: 500,
    DependencyTimeoutException.code: 503,
    CloudHsmInternalFailureException.code: 500,
}
CLIENT_ERROR_STATUS: Final = 400

Headers = list[tuple[bytes, bytes]]


def status_for(error: KmsError) -> int:
    """HTTP status for a KMS error: the table above, else 400 for client faults, 500 for faults."""
    status = STATUS_BY_CODE.get(error.code)
    if status is not None:
        return status
    # A fault the table does not name yet is still a server fault: retrying is the safer default.
    return 500 if error.fault else CLIENT_ERROR_STATUS


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        # awsJson timestamps are epoch seconds, a JSON number (botocore: `unixtimestamp`), with
        # millisecond precision as KMS sends them.
        return round(value.timestamp(), 3)
    raise TypeError(f"cannot encode {type(value).__name__} as KMS JSON")


# Datetimes and dataclasses go to `_json_default` as with `json` (orjson would write ISO strings).
_ORJSON_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Serialise a response dict to the wire: compact JSON, blobs base64, datetimes epoch.

    orjson (a C codec) on the hot path: the standard library's encoder was ~2 % of a
    GenerateDataKey's server time. Anything orjson refuses (an unpaired surrogate in a string a
    caller stored, a non-string key) goes through `json` with the same rules, as before."""
    try:
        return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


def json_headers(request_id: str, body_len: int) -> Headers:
    """Headers every KMS response carries, success or error."""
    return [
        (b"content-type", CONTENT_TYPE.encode()),
        (b"content-length", str(body_len).encode()),
        (b"x-amzn-requestid", request_id.encode()),
    ]


def as_client_error(exc: BaseException, request_id: str) -> KmsError:
    """The outermost guard: any non-KmsError becomes a generic KMSInternalException.

    WARNING: the traceback is logged server-side with the request id and never sent to the
    client; exception text can contain key material or paths.
    """
    if isinstance(exc, KmsError):
        return exc
    logger.error("unhandled error in request %s", request_id, exc_info=exc)
    return KMSInternalException(GENERIC_INTERNAL_MESSAGE)


def error_response(exc: BaseException, request_id: str) -> tuple[int, Headers, bytes, str]:
    """Status, headers, body and error code for any exception raised while serving a request."""
    error = as_client_error(exc, request_id)
    body = encode_json({"__type": error.code, "message": error.message})
    return status_for(error), json_headers(request_id, len(body)), body, error.code
