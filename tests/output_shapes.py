"""The response half of the KMS contract, for tests: is an answer what botocore's model says?

Owns: `output_validate(operation, response)`: encode `response` as the server would, parse it with
botocore's JSON parser and run botocore's ParamValidator on the operation's output shape; returns
the problems (empty when the answer fits). The model is the package's (`kms_model`), so requests
and responses are checked against the same copy; the package itself never checks its output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.parsers import JSONParser
from botocore.validate import ParamValidator

from hsmbridge.errors import UnknownOperationException
from hsmbridge.protocol.errors import encode_json
from hsmbridge.protocol.validation import kms_model, operation_names


def output_validate(operation: str, response: Mapping[str, Any]) -> list[str]:
    """Encode, parse and validate `response` as `operation`'s output; the problems found."""
    if operation not in operation_names():
        raise UnknownOperationException(f"Unknown operation {operation}")
    shape = kms_model().operation_model(operation).output_shape
    if shape is None:
        return [] if not response else [f"{operation} has no output, got {sorted(response)}"]
    wire = {"body": encode_json(response), "headers": {}, "status_code": 200}
    parsed = JSONParser().parse(wire, shape)
    parsed.pop("ResponseMetadata", None)
    report = ParamValidator().validate(parsed, shape)
    return [report.generate_report()] if report.has_errors() else []
