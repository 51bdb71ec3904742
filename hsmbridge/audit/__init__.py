"""hsmbridge.audit: audit events, and the key-label audit of custom key stores.

The importable API for audit scripts:

    report = run_audit(backend, StoreMetadataSource(meta, store_id), scope)
    for finding in report.at_or_above(Severity.MEDIUM): ...
    delete_orphans(backend, source, scope, report.of_kind(FindingKind.ORPHANED_MATERIAL), sink)

Must not import service, protocol, http or cli (the CLI composes these pieces).
"""

from hsmbridge.audit.cleanup import (
    OrphanDeletion,
    Outcome,
    delete_orphans,
    plan_orphan_deletion,
    recheck,
)
from hsmbridge.audit.findings import (
    SEVERITY_OF,
    AuditReport,
    AuditScope,
    Finding,
    FindingKind,
    Severity,
)
from hsmbridge.audit.kms_source import (
    KmsApiSource,
    KmsSourceError,
    KmsSourceUnreachableError,
    make_kms_client,
)
from hsmbridge.audit.material import find_material, material_dict
from hsmbridge.audit.reconcile import Progress, run_audit
from hsmbridge.audit.sources import (
    KeyStatus,
    KnownKey,
    MetadataSource,
    StoreMetadataSource,
    Tombstone,
)

__all__ = [
    "SEVERITY_OF",
    "AuditReport",
    "AuditScope",
    "Finding",
    "FindingKind",
    "KeyStatus",
    "KmsApiSource",
    "KmsSourceError",
    "KmsSourceUnreachableError",
    "KnownKey",
    "MetadataSource",
    "OrphanDeletion",
    "Outcome",
    "Progress",
    "Severity",
    "StoreMetadataSource",
    "Tombstone",
    "delete_orphans",
    "find_material",
    "make_kms_client",
    "material_dict",
    "plan_orphan_deletion",
    "recheck",
    "run_audit",
]
