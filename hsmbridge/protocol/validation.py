"""Request shape validation driven by botocore's service models (never a hand-kept copy).

Owns: `ModelValidator` (one per botocore service model: `validate_input`, `operation_names`,
`redacted_members`, `redact_params`) and the KMS functions of the same names over `kms`'s
validator; `validator(service)` gives any other model's (`protocol.cloudhsm` uses `cloudhsmv2`).
`validate_input` turns decoded params (JSON, or CBOR with bytes and datetimes) into typed-ish
params or raises SerializationException / ValidationException worded as AWS words them. Each
model is loaded once; each operation's validator is compiled once, so the request hot path does
no model lookups. (The tests' check of responses against the model is tests/output_shapes.py.)
Must not import: uvicorn, pkcs11, service or backend modules. Shape checks only; meaning (key
state, policy) belongs to the service layer.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, cast

import botocore.session
from botocore.model import ListShape, MapShape, OperationModel, ServiceModel, Shape, StructureShape

from hsmbridge.errors import (
    SerializationException,
    UnknownOperationException,
    ValidationException,
)
from hsmbridge.trail.events import REDACTED, SECRET_MEMBERS

# value, member path, error sink -> converted value. Type errors raise SerializationException at
# once (the document cannot be bound); constraint errors are collected, as AWS reports them all.
_Check = Callable[[Any, str, list[str]], Any]


_Compile = Callable[[Shape], _Check]

# Java regex classes botocore models use that Python's `re` lacks, as `re` classes (used inside
# a bracket class). \w is Python's letters, numbers and `_`: it stands for \p{L} and \p{N}
# (cloudhsmv2's TagKey/TagValue, the only users, allow `_` anyway). \p{Z}: Unicode separators.
_UNICODE_CLASSES: Final[Mapping[str, str]] = {
    r"\p{L}": r"\w",
    r"\p{N}": r"\w",
    r"\p{Z}": "\u0020\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000",
}


def _python_pattern(pattern: str) -> str:
    for java, python in _UNICODE_CLASSES.items():
        pattern = pattern.replace(java, python)
    return pattern


@cache
def _load_model(service: str) -> ServiceModel:
    return botocore.session.get_session().get_service_model(service)


def kms_model() -> ServiceModel:
    """botocore's KMS model, loaded once per process."""
    return _load_model("kms")


def _lower_camel(name: str) -> str:
    return name[:1].lower() + name[1:]


def _show(value: object, shape: Shape) -> str:
    # WARNING: never echo secrets in error messages; blobs and sensitive members show as ***.
    if shape.type_name == "blob" or shape.metadata.get("sensitive"):
        return "'***'"
    return f"'{value}'"


def _fail(errors: list[str], value: object, shape: Shape, path: str, rule: str) -> None:
    errors.append(
        f"Value {_show(value, shape)} at '{path}' failed to satisfy constraint: Member must {rule}"
    )


def _type_error(path: str, expected: str) -> SerializationException:
    return SerializationException(f"Unexpected value type at '{path}': expected {expected}")


def _check_size(size: int, value: object, shape: Shape, path: str, errors: list[str]) -> None:
    what = "value" if shape.type_name == "integer" else "length"
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    if low is not None and size < low:
        _fail(errors, value, shape, path, f"have {what} greater than or equal to {low}")
    if high is not None and size > high:
        _fail(errors, value, shape, path, f"have {what} less than or equal to {high}")


def _string_check(shape: Shape, compile_: _Compile) -> _Check:
    pattern = shape.metadata.get("pattern")
    regex = (
        re.compile(_python_pattern(pattern)) if pattern else None
    )  # Java `matches`: the whole value
    enum = shape.metadata.get("enum")
    allowed = frozenset(enum) if enum else None
    enum_text = ", ".join(enum or ())

    def check(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, str):
            raise _type_error(path, "a string")
        _check_size(len(value), value, shape, path, errors)
        if regex is not None and regex.fullmatch(value) is None:
            _fail(errors, value, shape, path, f"satisfy regular expression pattern: {pattern}")
        if allowed is not None and value not in allowed:
            _fail(errors, value, shape, path, f"satisfy enum value set: [{enum_text}]")
        return value

    return check


def _integer_check(shape: Shape, compile_: _Compile) -> _Check:
    def check(value: Any, path: str, errors: list[str]) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(path, "an integer")
        _check_size(value, value, shape, path, errors)
        return value

    return check


def _blob_check(shape: Shape, compile_: _Compile) -> _Check:
    def check(value: Any, path: str, errors: list[str]) -> Any:
        if isinstance(value, bytes):  # CBOR carries blobs as byte strings
            _check_size(len(value), value, shape, path, errors)
            return value
        if not isinstance(value, str):
            raise _type_error(path, "a base64-encoded string")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SerializationException(f"Value at '{path}' is not valid base64") from None
        _check_size(len(data), value, shape, path, errors)  # limits apply to decoded bytes
        return data

    return check


def _scalar_check(shape: Shape, compile_: _Compile) -> _Check:
    kind = shape.type_name

    def check(value: Any, path: str, errors: list[str]) -> Any:
        if kind == "boolean":
            if not isinstance(value, bool):
                raise _type_error(path, "a boolean")
            return value
        # timestamp: awsJson sends epoch seconds as a JSON number, CBOR a tag-1 datetime.
        if isinstance(value, datetime):
            return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _type_error(path, "a timestamp in epoch seconds")
        return datetime.fromtimestamp(value, UTC)

    return check


def _list_check(shape: Shape, compile_: _Compile) -> _Check:
    member = compile_(cast(ListShape, shape).member)

    def check(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, list):
            raise _type_error(path, "a list")
        _check_size(len(value), value, shape, path, errors)
        # AWS numbers list members from 1: 'tags.1.member.tagKey'.
        return [member(item, f"{path}.{i}.member", errors) for i, item in enumerate(value, 1)]

    return check


def _map_check(shape: Shape, compile_: _Compile) -> _Check:
    key_check = compile_(cast(MapShape, shape).key)
    value_check = compile_(cast(MapShape, shape).value)

    def check(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, dict):
            raise _type_error(path, "a map")
        _check_size(len(value), value, shape, path, errors)
        return {
            key_check(k, f"{path}.key", errors): value_check(v, f"{path}.{k}", errors)
            for k, v in value.items()
        }

    return check


def _structure_check(shape: Shape, compile_: _Compile) -> _Check:
    struct = cast(StructureShape, shape)
    members: dict[str, tuple[str, _Check]] = {}
    required = tuple(struct.required_members)

    def check(value: Any, path: str, errors: list[str]) -> Any:
        if not members:  # filled on first use, so recursive shapes terminate
            for name, child in struct.members.items():
                members[name] = (_lower_camel(name), compile_(child))
        if not isinstance(value, dict):
            raise _type_error(path or "body", "a JSON object")
        prefix = f"{path}." if path else ""
        for name in required:
            if value.get(name) is None:
                errors.append(
                    f"Value null at '{prefix}{_lower_camel(name)}' failed to satisfy"
                    " constraint: Member must not be null"
                )
        out: dict[str, Any] = {}
        for key, raw in value.items():
            entry = members.get(key)
            if entry is None or raw is None:  # AWS ignores unknown members; null means absent
                continue
            out[key] = entry[1](raw, prefix + entry[0], errors)
        return out

    return check


_BUILDERS: Mapping[str, Callable[[Shape, _Compile], _Check]] = {
    "structure": _structure_check,
    "list": _list_check,
    "map": _map_check,
    "string": _string_check,
    "integer": _integer_check,
    "long": _integer_check,
    "blob": _blob_check,
    "boolean": _scalar_check,
    "timestamp": _scalar_check,
}


class ModelValidator:
    """Input validation and audit redaction for one botocore service model."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.model = _load_model(service)
        self.operation_names = frozenset(self.model.operation_names)
        self._compiled: dict[str, _Check] = {}  # by shape name: names are unique per model
        self._inputs: dict[str, _Check | None] = {}
        self._redacted: dict[str, frozenset[str]] = {}

    def _operation(self, name: str) -> OperationModel:
        if name not in self.operation_names:
            raise UnknownOperationException(f"Unknown operation {name}")
        return self.model.operation_model(name)

    def _compile(self, shape: Shape) -> _Check:
        check = self._compiled.get(shape.name)
        if check is None:
            check = _BUILDERS[shape.type_name](shape, self._compile)
            self._compiled[shape.name] = check
        return check

    def _input_check(self, operation: str) -> _Check | None:
        if operation not in self._inputs:
            shape = self._operation(operation).input_shape
            self._inputs[operation] = None if shape is None else self._compile(shape)
        return self._inputs[operation]

    def validate_input(self, operation: str, params: Any) -> dict[str, Any]:
        """Check `params` against the operation's input shape; blobs come back as bytes and
        timestamps as aware datetimes. Raises SerializationException or ValidationException."""
        check = self._input_check(operation)
        if check is None:
            if not isinstance(params, dict):
                raise _type_error("body", "a JSON object")
            return {}
        errors: list[str] = []
        result: dict[str, Any] = check(params, "", errors)
        if errors:
            count = len(errors)
            noun = "error" if count == 1 else "errors"
            raise ValidationException(f"{count} validation {noun} detected: {'; '.join(errors)}")
        return result

    def redacted_members(self, operation: str) -> frozenset[str]:
        """Top-level input members of `operation` that audit events must not carry in clear."""
        found = self._redacted.get(operation)
        if found is None:
            shape = self._operation(operation).input_shape
            found = frozenset(
                ()
                if shape is None
                else (
                    name
                    for name, child in shape.members.items()
                    if child.type_name == "blob"
                    or child.metadata.get("sensitive")
                    or name in SECRET_MEMBERS
                )
            )
            self._redacted[operation] = found
        return found

    def redact_params(self, operation: str | None, params: Any) -> dict[str, Any]:
        """A request's parameters as the audit trail may carry them: the operation's blob and
        sensitive members, and every name in the trail's secret list at any depth, hidden."""
        known = operation is not None and operation in self.operation_names
        hidden = self.redacted_members(operation) if known and operation else frozenset()
        return _redact(params, hidden) if isinstance(params, dict) else {}


@cache
def validator(service: str) -> ModelValidator:
    """The validator of botocore's `service` model (e.g. "kms", "cloudhsmv2"), built once."""
    return ModelValidator(service)


def operation_names() -> frozenset[str]:
    """Every operation KMS has, to tell 'not implemented here' from 'no such operation'."""
    return validator("kms").operation_names


def validate_input(operation: str, params: Any) -> dict[str, Any]:
    """KMS's `ModelValidator.validate_input`."""
    return validator("kms").validate_input(operation, params)


def redacted_members(operation: str) -> frozenset[str]:
    """KMS's `ModelValidator.redacted_members`."""
    return validator("kms").redacted_members(operation)


def redact_params(operation: str | None, params: Any) -> dict[str, Any]:
    """KMS's `ModelValidator.redact_params`."""
    return validator("kms").redact_params(operation, params)


def _redact(value: Any, hidden: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if k in hidden or k in SECRET_MEMBERS else _redact(v, hidden)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v, hidden) for v in value]
    return value
