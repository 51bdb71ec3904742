"""Parse, generate and format KMS identifiers: key ids, key ARNs, alias names and ARNs, store ids.

Owns: the identifier grammar of KMS key ids, ARNs and aliases. Pure functions; must not import
anything but the
standard library and `hsmbridge.errors`.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from enum import Enum

from hsmbridge.errors import InvalidArnException, NotFoundException

KEY_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STORE_ID_RE = re.compile(r"^cks-[0-9a-f]{17}$")
CLUSTER_ID_RE = re.compile(r"^cluster-[2-7a-zA-Z]{11,16}$")
ALIAS_NAME_RE = re.compile(r"^alias/[a-zA-Z0-9:/_-]+$")
ARN_RE = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"(?P<kind>key|alias)/(?P<rest>.+)$"
)
RESERVED_ALIAS_PREFIX = "alias/aws/"


def new_key_id() -> str:
    return str(uuid.uuid4())


def new_custom_key_store_id() -> str:
    # NOTE: differs from KMS only in that the generator is unknown [U]; the shape matches.
    return "cks-" + secrets.token_hex(9)[:17]


def key_arn(partition: str, region: str, account: str, key_id: str) -> str:
    return f"arn:{partition}:kms:{region}:{account}:key/{key_id}"


def alias_arn(partition: str, region: str, account: str, alias_name: str) -> str:
    return f"arn:{partition}:kms:{region}:{account}:{alias_name}"


class RefKind(Enum):
    KEY_ID = "key-id"
    KEY_ARN = "key-arn"
    ALIAS_NAME = "alias-name"
    ALIAS_ARN = "alias-arn"


@dataclass(frozen=True)
class KeyRef:
    """A parsed `KeyId` request member: what the caller named, and how."""

    kind: RefKind
    value: str  # key id or alias name, without any ARN prefix
    region: str | None = None
    account: str | None = None
    partition: str | None = None  # set for the ARN forms only

    @property
    def is_alias(self) -> bool:
        return self.kind in (RefKind.ALIAS_NAME, RefKind.ALIAS_ARN)


@dataclass(frozen=True)
class ParsedArn:
    partition: str
    region: str
    account: str
    kind: str  # "key" or "alias"
    resource: str  # key id, or "alias/<name>"


def parse_kms_arn(text: str) -> ParsedArn | None:
    m = ARN_RE.match(text)
    if m is None:
        return None
    kind = m["kind"]
    resource = m["rest"] if kind == "key" else "alias/" + m["rest"]
    return ParsedArn(m["partition"], m["region"], m["account"], kind, resource)


def parse_key_ref(text: str, *, allow_alias: bool) -> KeyRef:
    """Parse a `KeyId` member. Unknown shapes are NotFound, as KMS answers for them."""
    if text.startswith("arn:"):
        arn = parse_kms_arn(text)
        if arn is None:
            raise InvalidArnException(f"Invalid arn {text}")
        if arn.kind == "key":
            return KeyRef(RefKind.KEY_ARN, arn.resource, arn.region, arn.account, arn.partition)
        if not allow_alias:
            raise NotFoundException(
                f"Alias ARN {text} is not accepted here; use a key ID or key ARN."
            )
        return KeyRef(RefKind.ALIAS_ARN, arn.resource, arn.region, arn.account, arn.partition)
    if text.startswith("alias/"):
        if not allow_alias:
            raise NotFoundException(f"Alias {text} is not accepted here; use a key ID or key ARN.")
        return KeyRef(RefKind.ALIAS_NAME, text)
    return KeyRef(RefKind.KEY_ID, text)


def is_key_id(text: str) -> bool:
    return KEY_ID_RE.match(text) is not None
