"""What a key-label audit reports: severities, finding kinds, findings and the report.

Owns: `Severity` (ordered, info < low < medium < high < critical), `FindingKind` with the
severity each kind carries (`SEVERITY_OF`, the one place that choice is made), the frozen `Finding`
record and `AuditReport`. Pure data; must not import backend, metadata, service, protocol, http
or cli.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


class Severity(enum.IntEnum):
    """Ordered so `--fail-on` is a plain comparison; printed and parsed in lower case."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        """Raises ValueError naming the accepted values."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            allowed = ", ".join(str(s) for s in cls)
            raise ValueError(f"unknown severity {text!r} (one of {allowed})") from None


class FindingKind(enum.StrEnum):
    MISSING_MATERIAL = "missing_material"  # a KMS key of the store with no HSM key
    DUPLICATE_LABEL = "duplicate_label"  # several HSM keys carry one KMS key ARN
    NON_COMPLIANT = "non_compliant"  # attributes break the template invariants
    MISPLACED_MATERIAL = "misplaced_material"  # labelled with a live key of another store
    ORPHANED_MATERIAL = "orphaned_material"  # labelled with a KMS key that no longer exists
    ID_MISMATCH = "id_mismatch"  # CKA_ID is not the key id in the label
    FOREIGN_LABEL = "foreign_label"  # a KMS key ARN of another account, region or partition
    NOT_KMS_ARN = "not_kms_arn"  # not a KMS key ARN at all
    IN_FLIGHT = "in_flight"  # CreateKey or deletion interrupted or still running


# Why these severities:
# - critical: ciphertexts under a KMS key with no material can never be decrypted again.
# - high: a duplicate label makes hsmbridge refuse to use the key (it cannot tell which object is
#   the backing key); a non-compliant key may be exportable or usable outside KMS's rules.
# - medium: orphaned or misplaced material breaks no live key, but holds key material nobody
#   controls through KMS and uses HSM object quota; it is what `delete-orphans` cleans up.
# - low: foreign labels, non-ARN labels and CKA_ID mismatches are someone else's keys or cosmetic;
#   the audit reports them but does not judge them.
# - info: in-flight rows resolve themselves through hsmbridge's start-up/connect recovery.
SEVERITY_OF: Mapping[FindingKind, Severity] = MappingProxyType(
    {
        FindingKind.MISSING_MATERIAL: Severity.CRITICAL,
        FindingKind.DUPLICATE_LABEL: Severity.HIGH,
        FindingKind.NON_COMPLIANT: Severity.HIGH,
        FindingKind.MISPLACED_MATERIAL: Severity.MEDIUM,
        FindingKind.ORPHANED_MATERIAL: Severity.MEDIUM,
        FindingKind.ID_MISMATCH: Severity.LOW,
        FindingKind.FOREIGN_LABEL: Severity.LOW,
        FindingKind.NOT_KMS_ARN: Severity.LOW,
        FindingKind.IN_FLIGHT: Severity.INFO,
    }
)


@dataclass(frozen=True)
class Finding:
    """One problem. `handle` is process-local (valid for this login only); `label` and `key_id`
    identify the object across processes. Fields that do not apply are None."""

    kind: FindingKind
    severity: Severity
    key_id: str | None
    arn: str | None
    handle: int | None
    label: str | None
    detail: str

    @classmethod
    def of(
        cls,
        kind: FindingKind,
        detail: str,
        *,
        key_id: str | None = None,
        arn: str | None = None,
        handle: int | None = None,
        label: str | None = None,
    ) -> Finding:
        """A finding with the severity its kind carries (SEVERITY_OF)."""
        return cls(kind, SEVERITY_OF[kind], key_id, arn, handle, label, detail)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "severity": str(self.severity),
            "key_id": self.key_id,
            "arn": self.arn,
            "handle": self.handle,
            "label": self.label,
            "detail": self.detail,
        }

    def sort_key(self) -> tuple[int, str, str, int]:
        return (-self.severity, self.kind.value, self.label or self.arn or "", self.handle or -1)


@dataclass(frozen=True)
class AuditScope:
    """Which KMS key ARNs belong to the audited store's account and region, and which store."""

    partition: str
    account_id: str
    region: str
    custom_key_store_id: str | None
    cluster_id: str

    def key_arn(self, key_id: str) -> str:
        return f"arn:{self.partition}:kms:{self.region}:{self.account_id}:key/{key_id}"


@dataclass(frozen=True)
class AuditReport:
    scope: AuditScope
    source: str  # "metadata" (hsmbridge's store) or "kms" (a KMS endpoint)
    hsm_objects: int
    kms_keys: int
    findings: tuple[Finding, ...]
    started_at: float
    duration_s: float
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def at_or_above(self, threshold: Severity) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity >= threshold)

    def of_kind(self, kind: FindingKind) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind is kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            "customKeyStoreId": self.scope.custom_key_store_id,
            "clusterId": self.scope.cluster_id,
            "source": self.source,
            "hsmObjects": self.hsm_objects,
            "kmsKeys": self.kms_keys,
            "startedAt": self.started_at,
            "durationSeconds": round(self.duration_s, 3),
            "maxSeverity": str(self.max_severity) if self.max_severity is not None else None,
            "counts": dict(self.counts),
            "findings": [f.to_dict() for f in self.findings],
        }


def count_by_kind(findings: tuple[Finding, ...]) -> dict[str, int]:
    return dict(sorted(Counter(f.kind.value for f in findings).items()))
