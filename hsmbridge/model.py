"""Domain types shared by every layer: key stores, keys, their states, and the enums KMS uses.

Owns: frozen dataclasses and `StrEnum`s whose values are the exact KMS wire strings, so the edge
can encode them without a lookup table. Must not import anything from hsmbridge; no I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class ConnectionState(enum.StrEnum):
    CONNECTED = "CONNECTED"
    CONNECTING = "CONNECTING"
    FAILED = "FAILED"
    DISCONNECTED = "DISCONNECTED"
    DISCONNECTING = "DISCONNECTING"


class ConnectionErrorCode(enum.StrEnum):
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    CLUSTER_NOT_FOUND = "CLUSTER_NOT_FOUND"
    NETWORK_ERRORS = "NETWORK_ERRORS"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    INSUFFICIENT_CLOUDHSM_HSMS = "INSUFFICIENT_CLOUDHSM_HSMS"
    USER_LOCKED_OUT = "USER_LOCKED_OUT"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    USER_LOGGED_IN = "USER_LOGGED_IN"
    SUBNET_NOT_FOUND = "SUBNET_NOT_FOUND"
    INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET = "INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET"


class CustomKeyStoreType(enum.StrEnum):
    AWS_CLOUDHSM = "AWS_CLOUDHSM"
    EXTERNAL_KEY_STORE = "EXTERNAL_KEY_STORE"


class KeyState(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PENDING_DELETION = "PendingDeletion"
    UNAVAILABLE = "Unavailable"


class KeyUsage(enum.StrEnum):
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"


class KeySpec(enum.StrEnum):
    SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"


class Origin(enum.StrEnum):
    AWS_CLOUDHSM = "AWS_CLOUDHSM"


class KeyLifecycle(enum.StrEnum):
    """Where a key row is in its crash-safe life; only LIVE rows are visible to clients."""

    CREATING = "CREATING"  # intent recorded, HSM call may or may not have happened
    LIVE = "LIVE"
    DELETING = "DELETING"  # deletion window over, material destruction in progress


@dataclass(frozen=True)
class Tag:
    key: str
    value: str


@dataclass(frozen=True)
class CustomKeyStore:
    """One CloudHSM custom key store as KMS describes it (the password is never part of it)."""

    store_id: str
    name: str
    cluster_id: str
    trust_anchor_pem: str
    connection_state: ConnectionState
    creation_date: float
    connection_error_code: ConnectionErrorCode | None = None
    store_type: CustomKeyStoreType = CustomKeyStoreType.AWS_CLOUDHSM


@dataclass(frozen=True)
class KeyRecord:
    """A KMS key as stored. `base_state` never holds Unavailable: that state is derived from the
    key store's connection, so reconnecting restores the key's own state for free."""

    key_id: str
    arn: str
    account_id: str
    region: str
    custom_key_store_id: str
    cluster_id: str
    description: str
    base_state: KeyState
    creation_date: float
    policy: str
    lifecycle: KeyLifecycle = KeyLifecycle.LIVE
    deletion_date: float | None = None
    pending_window_days: int | None = None
    key_usage: KeyUsage = KeyUsage.ENCRYPT_DECRYPT
    key_spec: KeySpec = KeySpec.SYMMETRIC_DEFAULT
    origin: Origin = Origin.AWS_CLOUDHSM
    tags: tuple[Tag, ...] = field(default=())


@dataclass(frozen=True)
class KeyIdentity:
    """A KMS key named both ways: what ListKeys lists and CancelKeyDeletion answers."""

    key_id: str
    arn: str


@dataclass(frozen=True)
class ScheduledDeletion:
    """What ScheduleKeyDeletion answers."""

    arn: str
    deletion_date: float
    pending_window_days: int


@dataclass(frozen=True)
class KeyMetadata:
    """What DescribeKey returns for a custom key store key."""

    aws_account_id: str
    key_id: str
    arn: str
    creation_date: float
    enabled: bool
    description: str
    key_usage: KeyUsage
    key_state: KeyState
    origin: Origin
    custom_key_store_id: str
    cloud_hsm_cluster_id: str
    key_spec: KeySpec
    deletion_date: float | None = None
    key_manager: str = "CUSTOMER"
    multi_region: bool = False
    encryption_algorithms: tuple[str, ...] = ("SYMMETRIC_DEFAULT",)


@dataclass(frozen=True)
class Alias:
    name: str
    arn: str
    target_key_id: str
    creation_date: float
    last_updated_date: float


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; `next_marker` is None on the last page."""

    items: tuple[T, ...]
    next_marker: str | None = None

    @property
    def truncated(self) -> bool:
        return self.next_marker is not None


@dataclass(frozen=True)
class GrantConstraints:
    """A grant's encryption-context constraint: at most one of the two is set.
    Pairs are kept as the caller wrote them; keys compare case-insensitively, values exactly."""

    equals: tuple[tuple[str, str], ...] | None = None
    subset: tuple[tuple[str, str], ...] | None = None

    @property
    def constraint_type(self) -> str | None:
        """The kms:GrantConstraintType value."""
        if self.equals is not None:
            return "EncryptionContextEquals"
        if self.subset is not None:
            return "EncryptionContextSubset"
        return None


@dataclass(frozen=True)
class Grant:
    """A grant on a key: its grantee may perform `operations` (KMS operation names) on it."""

    grant_id: str
    key_id: str
    key_arn: str
    name: str
    grantee_principal: str
    retiring_principal: str | None
    issuing_account: str  # arn:aws:iam::ACCOUNT:root of the key's account
    operations: tuple[str, ...]
    constraints: GrantConstraints | None
    creation_date: float
