"""Condition operators: parsing an operator name, compiling its values, and testing a request.

Owns: the operator families (String*, Numeric*, Date*, Bool, BinaryEquals, IpAddress,
NotIpAddress, Arn*, Null), the `IfExists` suffix and the `ForAnyValue:`/`ForAllValues:`
qualifiers, with AWS's rules for missing keys, multivalued keys and negated operators.
Must not import anything from hsmbridge except `errors` and its own package's `matching`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from hsmbridge.policy.matching import Resolver, Template, pattern_match

# A request's value for one key, as the evaluator passes it (see evaluation.ConditionValue).
Scalar = str | bool | int | float | datetime
Values = tuple[Scalar, ...]

_COMPARE: Final = {
    "equals": ("eq", False),
    "notequals": ("eq", True),
    "lessthan": ("lt", False),
    "lessthanequals": ("le", False),
    "greaterthan": ("gt", False),
    "greaterthanequals": ("ge", False),
}
# Every base operator (lower-cased) -> (family, comparison, negated).
_BASE: Final[dict[str, tuple[str, str, bool]]] = {
    "stringequals": ("string", "eq", False),
    "stringnotequals": ("string", "eq", True),
    "stringequalsignorecase": ("string", "eqi", False),
    "stringnotequalsignorecase": ("string", "eqi", True),
    "stringlike": ("string", "like", False),
    "stringnotlike": ("string", "like", True),
    **{f"numeric{k}": ("numeric", c, n) for k, (c, n) in _COMPARE.items()},
    **{f"date{k}": ("date", c, n) for k, (c, n) in _COMPARE.items()},
    "bool": ("bool", "eq", False),
    "binaryequals": ("binary", "eq", False),
    "ipaddress": ("ip", "eq", False),
    "notipaddress": ("ip", "eq", True),
    # IAM documents ArnEquals and ArnLike as the same comparison, wildcards included.
    "arnequals": ("arn", "like", False),
    "arnlike": ("arn", "like", False),
    "arnnotequals": ("arn", "like", True),
    "arnnotlike": ("arn", "like", True),
    "null": ("null", "eq", False),
}
_SET_OPS: Final = {"foranyvalue": "any", "forallvalues": "all"}
_ORDER: Final[dict[str, Callable[[float, float], bool]]] = {
    "eq": lambda a, b: a == b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


_EPOCH: Final = re.compile(r"^-?\d+(\.\d+)?$")


class ConditionError(ValueError):
    """An operator or value the policy language does not accept (document.py names where)."""


@dataclass(frozen=True, slots=True)
class Operator:
    """A parsed operator name: its family and comparison, and the qualifiers around it."""

    family: str  # "string" | "numeric" | "date" | "bool" | "binary" | "ip" | "arn" | "null"
    compare: str  # "eq" | "eqi" | "like" | "lt" | "le" | "gt" | "ge" (family-specific)
    negated: bool
    if_exists: bool
    set_op: str | None  # None | "any" | "all"


def parse_operator(name: str) -> Operator:
    """Parse e.g. "ForAnyValue:StringLikeIfExists"; ConditionError if IAM does not know it."""
    prefix, sep, rest = name.partition(":")
    set_op = _SET_OPS.get(prefix.lower()) if sep else None
    base = rest.lower() if sep else name.lower()
    if_exists = base.endswith("ifexists")
    if if_exists:
        base = base.removesuffix("ifexists")
    spec = _BASE.get(base)
    # Null tests existence itself, so it has no IfExists form.
    if (sep and set_op is None) or spec is None or (if_exists and base == "null"):
        raise ConditionError(f'unknown operator "{name}"')
    family, compare, negated = spec
    return Operator(family, compare, negated, if_exists, set_op)


# --- value parsing -----------------------------------------------------------------------------


def parse_number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_date(value: object) -> datetime | None:
    """ISO 8601 (date or date-time; naive means UTC) or epoch seconds, as IAM accepts."""
    parsed: datetime | None = None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            parsed = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            parsed = None
    elif isinstance(value, str):
        text = value.strip()
        if _EPOCH.match(text):
            return parse_date(float(text))
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            parsed = None
    if parsed is not None and parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    """One key of one operator block, with its values parsed for the family."""

    operator: Operator
    key: str  # lower-cased: condition key names are case-insensitive
    templates: tuple[Template, ...]  # string/arn families
    numbers: tuple[float, ...]
    dates: tuple[datetime, ...]
    networks: tuple[IpNetwork, ...]
    flags: tuple[str, ...]  # bool/null/binary values, lower-cased except binary

    def test(self, present: Values | None, resolver: Resolver) -> bool:
        """Does the request satisfy this condition? `present` is None when the key is absent;
        a single-valued key arrives as a 1-tuple."""
        op = self.operator
        if op.family == "null":
            absent = present is None or len(present) == 0
            return any((flag == "true") == absent for flag in self.flags)
        if present is None:
            # AWS: IfExists and ForAllValues hold for a missing key, ForAnyValue does not;
            # otherwise a positive operator fails and a negated one holds.
            if op.if_exists or op.set_op == "all":
                return True
            return op.negated and op.set_op is None
        if op.set_op is None and not present:
            return op.negated
        # Without a set qualifier a multivalued key needs one matching value for a positive
        # operator, and every value to avoid the policy's values for a negated one.
        every = op.set_op == "all" or (op.set_op is None and op.negated)
        combine = all if every else any
        return combine(self._one(v, resolver) for v in present)

    def _one(self, value: Scalar, resolver: Resolver) -> bool:
        """The operator for one request value: a positive operator matches when any policy
        value does; a negated one when none of them does."""
        hit = _POSITIVE[self.operator.family](self, value, resolver)
        return not hit if self.operator.negated else hit

    def _arn(self, value: Scalar, resolver: Resolver) -> bool:
        text = _as_text(value)
        for template in self.templates:
            want = template.resolve(resolver, as_pattern=True)
            if want is not None and pattern_match(want, text, arn=True):
                return True
        return False

    def _numeric(self, value: Scalar, _resolver: Resolver) -> bool:
        number = _as_number(value)
        cmp = _ORDER[self.operator.compare]
        return number is not None and any(cmp(number, n) for n in self.numbers)

    def _date(self, value: Scalar, _resolver: Resolver) -> bool:
        when = parse_date(value)
        cmp = _ORDER[self.operator.compare]
        return when is not None and any(cmp(when.timestamp(), d.timestamp()) for d in self.dates)

    def _bool(self, value: Scalar, _resolver: Resolver) -> bool:
        return _as_text(value).lower() in self.flags

    def _binary(self, value: Scalar, _resolver: Resolver) -> bool:
        return _as_text(value) in self.flags

    def _ip(self, value: Scalar, _resolver: Resolver) -> bool:
        try:
            address = ipaddress.ip_address(_as_text(value).strip())
        except ValueError:
            return False
        return any(address.version == net.version and address in net for net in self.networks)

    def _text(self, value: Scalar, resolver: Resolver) -> bool:
        return self._string(_as_text(value), resolver)

    def _string(self, text: str, resolver: Resolver) -> bool:
        compare = self.operator.compare
        for template in self.templates:
            if compare == "like":
                want = template.resolve(resolver, as_pattern=True)
                if want is not None and pattern_match(want, text):
                    return True
                continue
            want = template.resolve(resolver, as_pattern=False)
            if want is None:
                continue
            if want == text or (compare == "eqi" and want.casefold() == text.casefold()):
                return True
        return False


_POSITIVE: Final[dict[str, Callable[[CompiledCondition, Scalar, Resolver], bool]]] = {
    "string": CompiledCondition._text,
    "arn": CompiledCondition._arn,
    "numeric": CompiledCondition._numeric,
    "date": CompiledCondition._date,
    "bool": CompiledCondition._bool,
    "binary": CompiledCondition._binary,
    "ip": CompiledCondition._ip,
}


def _as_text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _as_number(value: Scalar) -> float | None:
    if isinstance(value, bool | datetime):
        return None
    if isinstance(value, int | float):
        return float(value)
    return parse_number(value)


def compile_condition(
    operator_name: str, key: str, values: Sequence[str], *, variables: bool
) -> CompiledCondition:
    """Compile one key of an operator block; ConditionError names what is wrong."""
    op = parse_operator(operator_name)
    templates: tuple[Template, ...] = ()
    numbers: tuple[float, ...] = ()
    dates: tuple[datetime, ...] = ()
    networks: tuple[IpNetwork, ...] = ()
    flags: tuple[str, ...] = ()
    if op.family in ("string", "arn"):
        templates = tuple(Template.parse(v, variables=variables) for v in values)
    elif op.family == "numeric":
        parsed_numbers = [parse_number(v) for v in values]
        if any(n is None for n in parsed_numbers):
            bad = values[parsed_numbers.index(None)]
            raise ConditionError(f'{operator_name} needs numbers, got "{bad}"')
        numbers = tuple(n for n in parsed_numbers if n is not None)
    elif op.family == "date":
        parsed_dates = [parse_date(v) for v in values]
        if any(d is None for d in parsed_dates):
            bad = values[parsed_dates.index(None)]
            raise ConditionError(
                f'{operator_name} needs ISO 8601 dates or epoch seconds, got "{bad}"'
            )
        dates = tuple(d for d in parsed_dates if d is not None)
    elif op.family == "ip":
        parsed_nets = [parse_network(v) for v in values]
        if any(n is None for n in parsed_nets):
            bad = values[parsed_nets.index(None)]
            raise ConditionError(f'{operator_name} needs IP addresses or CIDR blocks, got "{bad}"')
        networks = tuple(n for n in parsed_nets if n is not None)
    elif op.family == "null":
        flags = tuple(v.lower() for v in values)
        bad_flags = [v for v in values if v.lower() not in ("true", "false")]
        if bad_flags:
            raise ConditionError(f'Null takes "true" or "false", got "{bad_flags[0]}"')
    elif op.family == "bool":
        flags = tuple(v.lower() for v in values)
    else:
        flags = tuple(values)
    return CompiledCondition(op, key.lower(), templates, numbers, dates, networks, flags)
