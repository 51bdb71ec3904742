"""Parse and validate policy documents: key policies, IAM identity and session policies, and
role trust policies; build the default key policy.

Owns: the policy grammar (Version, Id, Statement; Sid, Effect, Principal/NotPrincipal,
Action/NotAction, Resource/NotResource, Condition) and what makes a document acceptable:
PutKeyPolicy/CreateKey's rules for key policies (characters, size, JSON, a principal in
every statement, principal ARN forms), IAM's for identity and trust policies. Documents are
stored as the caller wrote them; parsing yields the immutable `PolicyDocument` that
`evaluation` compiles and evaluates. Must not import anything above `errors`.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from hsmbridge.errors import LimitExceededException, MalformedPolicyDocumentException
from hsmbridge.policy.conditions import ConditionError, compile_condition
from hsmbridge.policy.matching import (
    ACCOUNT_ID,
    POLICY_VARIABLES_VERSION,
    is_principal_arn,
    root_arn,
)

# NOTE: differs from the model's 131,072 characters because the KMS Developer Guide documents a
# 32 KiB key-policy quota that is not adjustable; we follow the documented quota.
MAX_POLICY_BYTES: Final = 32 * 1024
_ALLOWED_CHARS: Final = re.compile(r"^[\t\n\r\u0020-\u00FF]*$")
_VERSIONS: Final = ("2008-10-17", "2012-10-17")
_TOP_LEVEL: Final = frozenset({"Version", "Id", "Statement"})
_STATEMENT_KEYS: Final = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)
_PRINCIPAL_KINDS: Final = ("AWS", "Service", "Federated")
_INVALID_PRINCIPALS: Final = "Policy contains a statement with one or more invalid principals."


class PolicyDocumentError(ValueError):
    """A document the policy grammar rejects; the message names the element, e.g.
    'Statement[2].Condition: unknown operator "StringEq"'."""


@dataclass(frozen=True, slots=True)
class Principals:
    """A parsed Principal or NotPrincipal element."""

    wildcard: bool  # "*" or {"AWS": "*"}
    aws: frozenset[str]  # 12-digit account ids normalised to arn:aws:iam::ID:root
    services: frozenset[str]
    federated: frozenset[str]


@dataclass(frozen=True, slots=True)
class Condition:
    operator: str  # as written, e.g. "ForAnyValue:StringLikeIfExists"
    key: str  # as written
    values: tuple[str, ...]  # JSON scalars rendered as strings: true -> "true", 5 -> "5"


@dataclass(frozen=True, slots=True)
class Statement:
    sid: str | None
    effect: str  # "Allow" | "Deny"
    principal: Principals | None
    not_principal: Principals | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[str, ...] | None
    not_resources: tuple[str, ...] | None
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    version: str | None
    id: str | None
    statements: tuple[Statement, ...]
    # Filled by `evaluation` on first use: the compiled form (patterns, parsed condition
    # values), so a cached document is compiled once however often it is evaluated.
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)
    # A trust policy's statements apply to their role without a Resource element; elsewhere
    # a statement without one applies to nothing.
    _implicit_resource: bool = field(default=False, repr=False, compare=False, kw_only=True)

    def aws_principals(self) -> frozenset[str]:
        """Every AWS principal ARN named in a Principal or NotPrincipal element."""
        found: set[str] = set()
        for statement in self.statements:
            for principals in (statement.principal, statement.not_principal):
                if principals is not None:
                    found.update(principals.aws)
        return frozenset(found)


def default_policy(partition: str, account_id: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


# --- grammar ------------------------------------------------------------------------------------


class _InvalidPrincipalError(PolicyDocumentError):
    """A principal in the wrong form: key policies report it in KMS's own words."""


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _strings(raw: Any, where: str) -> tuple[str, ...]:
    items = _as_list(raw)
    if not items:
        raise PolicyDocumentError(f"{where}: must name at least one value")
    for item in items:
        if not isinstance(item, str) or not item:
            raise PolicyDocumentError(
                f"{where}: must be a non-empty string or a list of them, got {item!r}"
            )
    return tuple(items)


def _principals(raw: Any, where: str) -> Principals:
    if raw == "*":
        return Principals(True, frozenset(), frozenset(), frozenset())
    if not isinstance(raw, dict) or not raw:
        raise PolicyDocumentError(
            f'{where}: must be "*" or an object with "AWS", "Service" or "Federated"'
        )
    wildcard = False
    found: dict[str, set[str]] = {kind: set() for kind in _PRINCIPAL_KINDS}
    for kind, values in raw.items():
        if kind not in found:
            raise PolicyDocumentError(
                f'{where}: unknown principal type "{kind}" (use AWS, Service or Federated)'
            )
        for value in _strings(values, f"{where}.{kind}"):
            if kind != "AWS":
                found[kind].add(value)
            elif value == "*":
                wildcard = True
            elif ACCOUNT_ID.match(value):
                found[kind].add(root_arn(value))
            elif is_principal_arn(value):
                found[kind].add(value)
            else:
                raise _InvalidPrincipalError(
                    f'{where}.AWS: "{value}" is not an account id or the ARN of an account root, '
                    "IAM user, IAM role or assumed-role session"
                )
    return Principals(
        wildcard,
        frozenset(found["AWS"]),
        frozenset(found["Service"]),
        frozenset(found["Federated"]),
    )


def _render(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise PolicyDocumentError(f"{where}: values must be strings, numbers or booleans")


def _conditions(raw: Any, where: str, *, variables: bool) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise PolicyDocumentError(f"{where}: must be an object of operators")
    found: list[Condition] = []
    for operator, block in raw.items():
        if not isinstance(block, dict) or not block:
            raise PolicyDocumentError(
                f"{where}.{operator}: must be an object of condition keys and values"
            )
        for key, values in block.items():
            if not key:
                raise PolicyDocumentError(f"{where}.{operator}: a condition key is empty")
            here = f"{where}.{operator}.{key}"
            rendered = tuple(_render(v, here) for v in _as_list(values))
            try:
                compile_condition(operator, key, rendered, variables=variables)
            except ConditionError as exc:
                raise PolicyDocumentError(f"{where}: {exc}") from None
            found.append(Condition(operator, key, rendered))
    return tuple(found)


def _pair(raw: Mapping[str, Any], name: str, where: str) -> tuple[tuple[str, ...] | None, ...]:
    both = (name in raw, f"Not{name}" in raw)
    if all(both):
        raise PolicyDocumentError(f"{where}: has both {name} and Not{name}; use one")
    return (
        _strings(raw[name], f"{where}.{name}") if both[0] else None,
        _strings(raw[f"Not{name}"], f"{where}.Not{name}") if both[1] else None,
    )


def _statement(raw: Any, where: str, kind: str, *, variables: bool) -> Statement:
    if not isinstance(raw, dict):
        raise PolicyDocumentError(f"{where}: must be a JSON object")
    unknown = sorted(set(raw) - _STATEMENT_KEYS)
    if unknown:
        raise PolicyDocumentError(f'{where}: unknown element "{unknown[0]}"')
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise PolicyDocumentError(f"{where}.Sid: must be a string")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyDocumentError(f'{where}.Effect: must be "Allow" or "Deny", got {effect!r}')
    has_principal = "Principal" in raw or "NotPrincipal" in raw
    if kind == "identity" and has_principal:
        name = "Principal" if "Principal" in raw else "NotPrincipal"
        raise PolicyDocumentError(
            f"{where}.{name}: identity-based and session policies cannot name a principal"
        )
    if kind != "identity" and not has_principal:
        raise PolicyDocumentError(
            f"{where}: has no Principal; every {kind} policy statement needs one"
        )
    if "Principal" in raw and "NotPrincipal" in raw:
        raise PolicyDocumentError(f"{where}: has both Principal and NotPrincipal; use one")
    principal = _principals(raw["Principal"], f"{where}.Principal") if "Principal" in raw else None
    not_principal = (
        _principals(raw["NotPrincipal"], f"{where}.NotPrincipal") if "NotPrincipal" in raw else None
    )
    actions, not_actions = _pair(raw, "Action", where)
    resources, not_resources = _pair(raw, "Resource", where)
    if kind != "key":
        # IAM insists on these; KMS accepts a key policy statement without them (it has no
        # effect).
        if actions is None and not_actions is None:
            raise PolicyDocumentError(f"{where}: has no Action or NotAction")
        for action in actions or not_actions or ():
            if action != "*" and ":" not in action:
                raise PolicyDocumentError(
                    f'{where}.Action: "{action}" needs a service prefix, e.g. "kms:Encrypt"'
                )
    if kind == "identity" and resources is None and not_resources is None:
        raise PolicyDocumentError(f"{where}: has no Resource or NotResource")
    conditions = (
        _conditions(raw["Condition"], f"{where}.Condition", variables=variables)
        if "Condition" in raw
        else ()
    )
    return Statement(
        sid, effect, principal, not_principal, actions, not_actions, resources, not_resources,
        conditions,
    )  # fmt: skip


def _document(doc: Any, kind: str) -> PolicyDocument:
    if not isinstance(doc, Mapping):
        raise PolicyDocumentError("the policy must be a JSON object")
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:
        raise PolicyDocumentError(f'unknown top-level element "{unknown[0]}"')
    version = doc.get("Version")
    if version is not None and version not in _VERSIONS:
        raise PolicyDocumentError(f'Version: must be "2012-10-17" or "2008-10-17", got {version!r}')
    policy_id = doc.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise PolicyDocumentError("Id: must be a string")
    if "Statement" not in doc:
        raise PolicyDocumentError("Statement: missing; a policy needs at least one statement")
    raw = doc["Statement"]
    if isinstance(raw, list) and not raw:
        raise PolicyDocumentError("Statement: is empty; a policy needs at least one statement")
    variables = version == POLICY_VARIABLES_VERSION
    statements = tuple(
        _statement(s, f"Statement[{i}]", kind, variables=variables)
        for i, s in enumerate(_as_list(raw))
    )
    return PolicyDocument(version, policy_id, statements, _implicit_resource=kind == "trust")


# json.loads recurses once per nesting level; a 32 KiB document can nest past the interpreter's
# limit, which must be the caller's error, not a crash.
_TOO_DEEP = "is nested too deeply to be a policy document"


def _decode(doc: str | Mapping[str, Any]) -> Any:
    if not isinstance(doc, str):
        return doc
    text = doc.strip()
    # `aws iam get-account-authorization-details` returns documents URL-encoded.
    if text[:3].upper() == "%7B":
        text = urllib.parse.unquote(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyDocumentError(f"the policy is not valid JSON: {exc}") from None
    except RecursionError:
        raise PolicyDocumentError(f"the policy {_TOO_DEEP}") from None


def parse_key_policy(text: str) -> PolicyDocument:
    """Validate a key policy as PutKeyPolicy/CreateKey do; raise the KMS exception a real
    client would get (LimitExceededException for size, MalformedPolicyDocumentException else)."""
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise LimitExceededException(
            f"The key policy is larger than the {MAX_POLICY_BYTES}-byte key policy quota."
        )
    if not _ALLOWED_CHARS.match(text):
        raise MalformedPolicyDocumentException(
            "The key policy contains characters outside tab, LF, CR and \\u0020-\\u00FF."
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedPolicyDocumentException(f"The key policy is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedPolicyDocumentException(f"The key policy {_TOO_DEEP}.") from None
    try:
        return _document(doc, "key")
    except _InvalidPrincipalError as exc:
        raise MalformedPolicyDocumentException(f"{_INVALID_PRINCIPALS} {exc}") from None
    except PolicyDocumentError as exc:
        raise MalformedPolicyDocumentException(f"The key policy is not valid: {exc}") from None


# Existing callers in hsmbridge.service use this name.
parse_policy = parse_key_policy


def parse_identity_policy(doc: str | Mapping[str, Any]) -> PolicyDocument:
    """An IAM identity-based policy or an STS session policy: no Principal or NotPrincipal;
    every statement needs an Action and a Resource. Accepts JSON text, URL-encoded JSON text
    or an already-decoded mapping."""
    return _document(_decode(doc), "identity")


def parse_trust_policy(doc: str | Mapping[str, Any]) -> PolicyDocument:
    """An IAM role trust policy: every statement names a principal; Resource is optional."""
    return _document(_decode(doc), "trust")
