"""Safe removal of orphaned key material found by an audit.

Owns: `delete_orphans()`. It destroys only `ORPHANED_MATERIAL` findings, one HSM object at a time,
each re-checked right before its destruction (the label still names an in-scope KMS key ARN, the
object with that handle still carries the label, and the metadata side still has no KMS key with
that id in any store), and records one `AuditEvent` per destruction attempt. Foreign labels,
non-compliant keys of live KMS keys, misplaced and in-flight material are never touched.
Must not import service, protocol, http or cli.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from hsmbridge.audit.findings import AuditReport, AuditScope, Finding, FindingKind
from hsmbridge.audit.reconcile import label_key_id
from hsmbridge.audit.sources import MetadataSource
from hsmbridge.backend.errors import BackendError
from hsmbridge.backend.interface import HsmBackend
from hsmbridge.trail.events import AuditEvent, AuditSink

EVENT_NAME = "DeleteOrphanedKeyMaterial"


class Outcome(enum.StrEnum):
    PLANNED = "would_delete"  # a dry run: nothing was touched
    DELETED = "deleted"
    SKIPPED = "skipped"  # the re-check found the object no longer orphaned (or gone)
    FAILED = "failed"  # the HSM refused; nothing is known to be destroyed


@dataclass(frozen=True)
class OrphanDeletion:
    finding: Finding
    outcome: Outcome
    reason: str


def plan_orphan_deletion(report: AuditReport) -> list[OrphanDeletion]:
    """The dry run: every orphan of the report, touched by nothing."""
    return [
        OrphanDeletion(f, Outcome.PLANNED, "dry run: would destroy")
        for f in report.of_kind(FindingKind.ORPHANED_MATERIAL)
    ]


def delete_orphans(
    hsm: HsmBackend,
    source: MetadataSource,
    scope: AuditScope,
    orphans: Iterable[Finding],
    audit: AuditSink,
) -> list[OrphanDeletion]:
    """Destroy exactly the listed orphans that are still orphans; never anything else."""
    return [_delete_one(hsm, source, scope, finding, audit) for finding in orphans]


def _delete_one(
    hsm: HsmBackend, source: MetadataSource, scope: AuditScope, finding: Finding, audit: AuditSink
) -> OrphanDeletion:
    reason = recheck(hsm, source, scope, finding)
    if reason is not None:
        return OrphanDeletion(finding, Outcome.SKIPPED, reason)
    assert finding.label is not None  # recheck guarantees it
    try:
        destroyed = hsm.destroy_key(finding.label, finding.handle)
    except BackendError as exc:
        _emit(audit, scope, finding, 0, error=type(exc).__name__)
        return OrphanDeletion(finding, Outcome.FAILED, f"the HSM refused: {type(exc).__name__}")
    _emit(audit, scope, finding, destroyed)
    if destroyed == 0:
        return OrphanDeletion(finding, Outcome.SKIPPED, "the object vanished before deletion")
    return OrphanDeletion(finding, Outcome.DELETED, f"destroyed handle {finding.handle}")


def recheck(
    hsm: HsmBackend, source: MetadataSource, scope: AuditScope, finding: Finding
) -> str | None:
    """None if the finding is still an orphan now; otherwise why it must not be deleted."""
    if finding.kind is not FindingKind.ORPHANED_MATERIAL:
        return f"not an orphan ({finding.kind.value}); only orphans are ever deleted"
    if finding.label is None or finding.handle is None or finding.key_id is None:
        return "the finding does not name one HSM object"
    key_id, _ = label_key_id(finding.label, scope)
    if key_id != finding.key_id:
        return "the label no longer names this store's KMS key"
    # One label search per orphan: this path is for the few orphans, not the whole token.
    if not any(info.handle == finding.handle for info in hsm.find_keys(finding.label)):
        return "no HSM object with this handle carries the label any more"
    if source.lookup(key_id) is not None:
        return "a KMS key with this id exists now"
    return None


def _emit(
    audit: AuditSink, scope: AuditScope, finding: Finding, destroyed: int, error: str | None = None
) -> None:
    audit.emit(
        AuditEvent(
            EVENT_NAME,
            key_arn=finding.arn,
            custom_key_store_id=scope.custom_key_store_id,
            error_code=error,
            additional={
                "eventType": "AuditCleanup",
                "clusterId": scope.cluster_id,
                # NOTE: handles are process-local in PKCS#11; label and CKA_ID identify the
                # object across processes, as in the service's DeleteKey events.
                "keyHandle": finding.handle,
                "keyLabel": finding.label,
                "backingKeyId": finding.key_id,
                "objectsDestroyed": destroyed,
                "finding": finding.detail,
            },
        )
    )
