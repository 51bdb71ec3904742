"""Parse and validate key-policy JSON documents, and build the default key policy.

Owns: what makes a key policy acceptable to PutKeyPolicy/CreateKey (spec §8.3): allowed
characters, size, JSON shape, statements with an Effect and a Principal. Policies are stored as
the caller wrote them. Evaluation is not done yet. Must not import anything above `errors`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from hsmbridge.errors import LimitExceededException, MalformedPolicyDocumentException

# NOTE: differs from the model's 131,072 characters because the KMS Developer Guide documents a
# 32 KiB key-policy quota that is not adjustable; we follow the documented quota (spec §13.4).
MAX_POLICY_BYTES = 32 * 1024
_ALLOWED_CHARS = re.compile(r"^[\t\n\r\u0020-\u00FF]*$")
_PRINCIPAL_ARN = re.compile(r"^(\*|\d{12}|arn:aws[a-z-]*:(iam|sts)::\d{12}:[\w+=,.@/:-]+)$")


@dataclass(frozen=True)
class Statement:
    sid: str | None
    effect: str
    principals: tuple[str, ...]
    actions: tuple[str, ...]


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


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _principals(raw: Any, index: int) -> tuple[str, ...]:
    where = f"statement {index + 1}"
    if raw == "*":
        return ("*",)
    if not isinstance(raw, dict) or not raw:
        raise MalformedPolicyDocumentException(
            f"The new key policy contains a statement ({where}) with no valid Principal."
        )
    found: list[str] = []
    for kind, values in raw.items():
        for value in _as_list(values):
            if not isinstance(value, str):
                raise MalformedPolicyDocumentException(
                    f"The new key policy contains an invalid principal in {where}."
                )
            if kind == "AWS" and not _PRINCIPAL_ARN.match(value):
                raise MalformedPolicyDocumentException(
                    f"The new key policy contains a statement ({where}) with one or more invalid "
                    f"principals: {value!r}."
                )
            found.append(f"{kind}:{value}")
    return tuple(found)


def _statement(raw: Any, index: int) -> Statement:
    if not isinstance(raw, dict):
        raise MalformedPolicyDocumentException(f"Statement {index + 1} is not a JSON object.")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise MalformedPolicyDocumentException(
            f'Statement {index + 1} needs an Effect of "Allow" or "Deny".'
        )
    if "Principal" not in raw:
        raise MalformedPolicyDocumentException(
            f"Statement {index + 1} has no Principal; every key policy statement needs one."
        )
    actions = tuple(str(a) for a in _as_list(raw.get("Action", [])))
    sid = raw.get("Sid")
    return Statement(
        sid if isinstance(sid, str) else None, effect, _principals(raw["Principal"], index), actions
    )


def parse_policy(text: str) -> tuple[Statement, ...]:
    """Validate a policy document; raise the KMS exception a real client would get."""
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
    if not isinstance(doc, dict):
        raise MalformedPolicyDocumentException("The key policy must be a JSON object.")
    statements = doc.get("Statement")
    if statements is None:
        raise MalformedPolicyDocumentException("The key policy has no Statement.")
    return tuple(_statement(s, i) for i, s in enumerate(_as_list(statements)))
