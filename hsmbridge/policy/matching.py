"""Wildcards, ARNs and policy variables: the string matching every policy element shares.

Owns: `Template` (a policy string with `${...}` variables, resolved per request), wildcard
patterns (`*`, `?`) compiled once and cached, segment-wise ARN matching as IAM does it for
Resource and the Arn* condition operators, and the ARN shapes a Principal may name.
Must not import anything from hsmbridge except `errors` (and it needs none today).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

# Resolves a variable name (as written, without `${}`) to its single value, or None.
Resolver = Callable[[str], str | None]

POLICY_VARIABLES_VERSION: Final = "2012-10-17"
_VARIABLE: Final = re.compile(r"\$\{([^}]*)\}")
# `${key, 'default'}`: the key, a comma, and a single-quoted default.
_WITH_DEFAULT: Final = re.compile(r"^\s*([^,\s]+)\s*,\s*'([^']*)'\s*$")
# Characters that stand for themselves when written as a variable, so a policy can match a
# literal `*`, `?` or `$` in a Like operator or a Resource.
_SPECIAL: Final = {"*": "*", "?": "?", "$": "$"}

ACCOUNT_ID: Final = re.compile(r"^\d{12}$")
_PRINCIPAL_ARN: Final = re.compile(
    r"^arn:aws[a-z-]*:(?:"
    r"iam::\d{12}:(?:root|user/[\w+=,.@/-]+|role/[\w+=,.@/-]+|federated-user/[\w+=,.@-]+)"
    r"|sts::\d{12}:(?:assumed-role/[\w+=,.@-]+/[\w+=,.@-]+|federated-user/[\w+=,.@-]+)"
    r")$"
)


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str
    default: str | None


_Part = _Literal | _Variable


@lru_cache(maxsize=8192)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """`pattern` with `*` and `?` as wildcards and everything else literal."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def wildcard_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    if pattern == "*":
        return True
    if "*" not in pattern and "?" not in pattern:
        return pattern.casefold() == value.casefold() if ignore_case else pattern == value
    return _wildcard(pattern, ignore_case).fullmatch(value) is not None


def arn_match(pattern: str, value: str) -> bool:
    """IAM's ARN comparison: each of the six colon-separated parts on its own, case-sensitive,
    so a wildcard in the region never swallows the account. Patterns that are not six-part ARNs
    are compared as a whole."""
    if pattern == "*":
        return True
    want = pattern.split(":", 5)
    if len(want) < 6:
        return wildcard_match(pattern, value)
    have = value.split(":", 5)
    if len(have) < 6:
        return False
    return all(wildcard_match(p, v) for p, v in zip(want, have, strict=True))


def _escape_wildcards(text: str) -> str:
    # A resolved variable is data, not pattern: a user named "a*" must not become a wildcard.
    return text.replace("*", "\x00").replace("?", "\x01")


def _unescape(text: str) -> str:
    return text.replace("\x00", "*").replace("\x01", "?")


@dataclass(frozen=True, slots=True)
class Template:
    """A policy string, parsed once. Without variables `static` holds the text and matching
    costs nothing extra; with them, `resolve` builds the request's text."""

    text: str
    parts: tuple[_Part, ...]
    static: str | None

    @staticmethod
    def parse(text: str, *, variables: bool) -> Template:
        if not variables or "${" not in text:
            return Template(text, (_Literal(text),), text)
        parts: list[_Part] = []
        pos = 0
        for m in _VARIABLE.finditer(text):
            if m.start() > pos:
                parts.append(_Literal(text[pos : m.start()]))
            inner = m.group(1)
            with_default = _WITH_DEFAULT.match(inner)
            if inner.strip() in _SPECIAL:
                parts.append(_Literal(_escape_wildcards(_SPECIAL[inner.strip()])))
            elif with_default:
                parts.append(_Variable(with_default.group(1), with_default.group(2)))
            else:
                parts.append(_Variable(inner.strip(), None))
            pos = m.end()
        if pos < len(text):
            parts.append(_Literal(text[pos:]))
        if all(isinstance(p, _Literal) for p in parts):
            joined = "".join(p.text for p in parts if isinstance(p, _Literal))
            if "\x00" not in joined and "\x01" not in joined:
                return Template(text, tuple(parts), joined)
        return Template(text, tuple(parts), None)

    def resolve(self, resolver: Resolver, *, as_pattern: bool) -> str | None:
        """The request's text, or None when a variable has no value and no default. With
        `as_pattern`, substituted values are protected from wildcard expansion (callers pass
        the result to `pattern_match`)."""
        if self.static is not None:
            return self.static
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, _Literal):
                out.append(part.text)
                continue
            value = resolver(part.name)
            if value is None:
                value = part.default
            if value is None:
                return None
            out.append(_escape_wildcards(value) if as_pattern else value)
        text = "".join(out)
        return text if as_pattern else _unescape(text)


def pattern_match(
    resolved: str, value: str, *, ignore_case: bool = False, arn: bool = False
) -> bool:
    """Match `value` against a pattern from `Template.resolve(as_pattern=True)`."""
    if "\x00" not in resolved and "\x01" not in resolved:
        return (
            arn_match(resolved, value)
            if arn
            else wildcard_match(resolved, value, ignore_case=ignore_case)
        )
    if arn:
        want = resolved.split(":", 5)
        have = value.split(":", 5)
        if len(want) == 6:
            if len(have) < 6:
                return False
            return all(_protected_match(p, v, False) for p, v in zip(want, have, strict=True))
    return _protected_match(resolved, value, ignore_case)


@lru_cache(maxsize=4096)
def _protected(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    body = "".join(
        ".*"
        if ch == "*"
        else "."
        if ch == "?"
        else re.escape("*" if ch == "\x00" else "?" if ch == "\x01" else ch)
        for ch in pattern
    )
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _protected_match(pattern: str, value: str, ignore_case: bool) -> bool:
    return _protected(pattern, ignore_case).fullmatch(value) is not None


def is_principal_arn(value: str) -> bool:
    """An account id or an ARN IAM accepts in a Principal's "AWS" list."""
    return bool(ACCOUNT_ID.match(value) or _PRINCIPAL_ARN.match(value))


def root_arn(account_id: str, partition: str = "aws") -> str:
    return f"arn:{partition}:iam::{account_id}:root"


def root_account(arn: str) -> str | None:
    """The account of an account root ARN (`arn:PARTITION:iam::ID:root`), else None."""
    parts = arn.split(":")
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "iam" and parts[5] == "root":
        return parts[4]
    return None
