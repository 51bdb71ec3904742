"""The key-label audit itself: reconcile one HSM enumeration with the store's KMS keys.

Owns: `run_audit()`. The HSM side is one `HsmBackend.list_keys()` call (one batched scan with
attributes); the metadata side is one `MetadataSource.store_keys()` listing plus the tombstones.
Every object is then classified in memory, so the cost is linear in objects + keys; a per-key
lookup is made only for labels of keys the store does not hold (orphan candidates). Attribute
rules come from `hsmbridge.backend.templates.violations`, never restated here.
Must not import service, protocol, http or cli.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from hsmbridge import ids
from hsmbridge.audit.findings import (
    AuditReport,
    AuditScope,
    Finding,
    FindingKind,
    count_by_kind,
)
from hsmbridge.audit.material import key_id_text
from hsmbridge.audit.sources import KeyStatus, KnownKey, MetadataSource, Tombstone
from hsmbridge.backend.interface import HsmKeyInfo
from hsmbridge.backend.templates import violations

Progress = Callable[[str, int, int | None], None]  # (phase, done, total or None)


class KeyLister(Protocol):
    """The one HsmBackend call an audit needs."""

    def list_keys(self) -> Iterator[HsmKeyInfo]: ...


def run_audit(
    hsm: KeyLister,
    source: MetadataSource,
    scope: AuditScope,
    *,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
) -> AuditReport:
    """Compare every secret key on the token with the store's KMS keys; see findings.py."""
    started, t0 = clock(), time.perf_counter()
    tick = progress or _no_progress
    known = {k.key_id: k for k in source.store_keys()}
    tick("scanning HSM objects", 0, None)
    objects = list(hsm.list_keys())
    findings: list[Finding] = []
    by_key_id: dict[str, list[HsmKeyInfo]] = defaultdict(list)
    for done, info in enumerate(objects, 1):
        findings.extend(_check_object(info, scope, by_key_id))
        tick("checking HSM objects", done, len(objects))
    findings.extend(_duplicates(by_key_id))
    findings.extend(_known_keys(known, by_key_id))
    findings.extend(_unknown_labels(by_key_id, known, source, scope))
    ordered = tuple(sorted(findings, key=Finding.sort_key))
    return AuditReport(
        scope=scope,
        source=source.name,
        hsm_objects=len(objects),
        kms_keys=len(known),
        findings=ordered,
        started_at=started,
        duration_s=time.perf_counter() - t0,
        counts=count_by_kind(ordered),
    )


def _no_progress(phase: str, done: int, total: int | None) -> None:
    return None


def label_key_id(label: str, scope: AuditScope) -> tuple[str | None, Finding | None]:
    """The key id an in-scope KMS key ARN label names, or the finding for any other label."""
    arn = ids.parse_kms_arn(label)
    if arn is None or arn.kind != "key" or not ids.is_key_id(arn.resource):
        return None, Finding.of(
            FindingKind.NOT_KMS_ARN, "the label is not a KMS key ARN", label=label
        )
    if (arn.partition, arn.account, arn.region) != (
        scope.partition,
        scope.account_id,
        scope.region,
    ):
        return None, Finding.of(
            FindingKind.FOREIGN_LABEL,
            f"a KMS key ARN of account {arn.account} in {arn.partition}/{arn.region}, not of "
            f"this store's {scope.account_id} in {scope.partition}/{scope.region}",
            key_id=arn.resource,
            arn=label,
            label=label,
        )
    return arn.resource, None


def _check_object(
    info: HsmKeyInfo, scope: AuditScope, by_key_id: dict[str, list[HsmKeyInfo]]
) -> list[Finding]:
    key_id, other = label_key_id(info.label, scope)
    if key_id is None:
        assert other is not None
        # Foreign and non-ARN labels are reported, not judged: no attribute checks on them.
        return [_with_handle(other, info.handle)]
    by_key_id[key_id].append(info)
    where: dict[str, Any] = {
        "key_id": key_id,
        "arn": info.label,
        "handle": info.handle,
        "label": info.label,
    }
    found = []
    problems = violations(info)
    if problems:
        found.append(Finding.of(FindingKind.NON_COMPLIANT, "; ".join(problems), **where))
    if info.key_id != key_id.encode("ascii"):
        found.append(
            Finding.of(
                FindingKind.ID_MISMATCH,
                f"CKA_ID is {key_id_text(info.key_id)!r}, not the key id in the label",
                **where,
            )
        )
    return found


def _with_handle(finding: Finding, handle: int) -> Finding:
    return Finding(
        finding.kind,
        finding.severity,
        finding.key_id,
        finding.arn,
        handle,
        finding.label,
        finding.detail,
    )


def _duplicates(by_key_id: Mapping[str, list[HsmKeyInfo]]) -> Iterator[Finding]:
    for key_id, infos in by_key_id.items():
        if len(infos) < 2:
            continue
        handles = ", ".join(str(i.handle) for i in infos)
        for info in infos:
            yield Finding.of(
                FindingKind.DUPLICATE_LABEL,
                f"{len(infos)} HSM keys carry this label (handles {handles})",
                key_id=key_id,
                arn=info.label,
                handle=info.handle,
                label=info.label,
            )


def _known_keys(
    known: Mapping[str, KnownKey], by_key_id: Mapping[str, list[HsmKeyInfo]]
) -> Iterator[Finding]:
    for key_id, key in known.items():
        objects = by_key_id.get(key_id, [])
        if key.status is KeyStatus.LIVE:
            if not objects:
                yield Finding.of(
                    FindingKind.MISSING_MATERIAL,
                    f"KMS key (KeyState {key.key_state}) has no HSM key labelled with its ARN",
                    key_id=key_id,
                    arn=key.arn,
                    label=key.arn,
                )
            continue
        yield Finding.of(
            FindingKind.IN_FLIGHT,
            _in_flight_detail(key, len(objects)),
            key_id=key_id,
            arn=key.arn,
            handle=objects[0].handle if len(objects) == 1 else None,
            label=key.arn,
        )


def _in_flight_detail(key: KnownKey, n_objects: int) -> str:
    what = (
        "CreateKey not finished (interrupted or running)"
        if key.status is KeyStatus.CREATING
        else "deletion not finished (interrupted or running)"
    )
    return (
        f"{what}; {n_objects} HSM key(s) carry its label; hsmbridge's recovery finishes or "
        "rolls it back when the store connects or the server starts"
    )


def _unknown_labels(
    by_key_id: Mapping[str, list[HsmKeyInfo]],
    known: Mapping[str, KnownKey],
    source: MetadataSource,
    scope: AuditScope,
) -> Iterator[Finding]:
    tombstones = source.tombstones()
    for key_id, infos in by_key_id.items():
        if key_id in known:
            continue
        elsewhere = source.lookup(key_id)  # only orphan candidates cost a lookup
        if elsewhere is not None and belongs_to_scope(elsewhere, scope):
            continue  # created after the listing: not ours to judge in this pass
        for info in infos:
            where: dict[str, Any] = {"key_id": key_id, "arn": info.label, "handle": info.handle}
            if elsewhere is not None:
                yield Finding.of(
                    FindingKind.MISPLACED_MATERIAL,
                    f"labelled with a live KMS key of custom key store "
                    f"{elsewhere.custom_key_store_id}, not of this store",
                    label=info.label,
                    **where,
                )
            else:
                yield Finding.of(
                    FindingKind.ORPHANED_MATERIAL,
                    orphan_detail(tombstones.get(key_id)),
                    label=info.label,
                    **where,
                )


def belongs_to_scope(key: KnownKey, scope: AuditScope) -> bool:
    if scope.custom_key_store_id is not None:
        return key.custom_key_store_id == scope.custom_key_store_id
    return key.cluster_id == scope.cluster_id


def orphan_detail(tomb: Tombstone | None) -> str:
    if tomb is None:
        return "no KMS key exists for this label (no deletion record either)"
    when = datetime.fromtimestamp(tomb.deleted_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if tomb.material_deleted:
        return f"the KMS key's deletion completed at {when} and reported its material destroyed"
    return (
        f"the KMS key's deletion completed at {when} while the store was disconnected; its "
        "material was never destroyed"
    )
