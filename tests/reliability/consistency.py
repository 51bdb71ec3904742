"""The key-label consistency check the reliability tests run after every crash, fault and load run.

Metadata and HSM must agree, key by key: every LIVE key has exactly one HSM key labelled with its
ARN, and every HSM key belongs to a LIVE key, except the documented disconnected-deletion orphans
(material left in the HSM because the store was disconnected when the waiting period ended), which
must be recorded as tombstones with material_deleted=False. No intent row (CREATING, DELETING) may
be left once recovery ran and nothing is in flight.

Two ways to read the HSM: `labels_via_pkcs11_tool` (OpenSC in another process: the independent
witness, and the only way for servers running in a subprocess, whose SoftHSM the pytest process
must not load) and `labels_of` (an in-process `HsmBackend`, i.e. the code under test). The
metadata is read through the production store the configuration names
(`bootstrap.open_metadata_store`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hsmbridge import bootstrap
from hsmbridge.backend import HsmBackend
from hsmbridge.config import Settings
from hsmbridge.metadata.store import DeletedKey, MetadataStore
from hsmbridge.model import KeyLifecycle, KeyRecord
from tests import pkcs11_tool
from tests.cloudhsm_shim import run_hsm


@dataclass
class Report:
    live: int = 0
    hsm_objects: int = 0
    recorded_orphans: int = 0
    problems: list[str] = field(default_factory=list)

    def assert_clean(self, context: str = "") -> None:
        assert not self.problems, f"{context}: inconsistent key store:\n" + "\n".join(self.problems)


def check(
    labels: Iterable[str], records: Iterable[KeyRecord], tombstones: Iterable[DeletedKey]
) -> Report:
    """Compare HSM labels with key rows and tombstones of one store (one token)."""
    hsm = Counter(labels)
    rows = list(records)
    tombs = {t.arn: t for t in tombstones}
    report = Report(hsm_objects=sum(hsm.values()))
    live = set()
    for row in rows:
        if row.lifecycle is not KeyLifecycle.LIVE:
            report.problems.append(f"intent row left behind: {row.key_id} {row.lifecycle}")
            continue
        live.add(row.arn)
        report.live += 1
        if hsm[row.arn] == 0:
            report.problems.append(f"missing key material: {row.arn}")
        elif hsm[row.arn] > 1:
            report.problems.append(f"duplicate label x{hsm[row.arn]}: {row.arn}")
    for label, count in hsm.items():
        if label in live:
            continue
        tomb = tombs.get(label)
        if tomb is not None and not tomb.material_deleted and count == 1:
            report.recorded_orphans += 1
            continue
        why = "deleted key's material still present" if tomb is not None else "orphan"
        report.problems.append(f"{why} (x{count}): {label}")
    return report


def read_metadata(settings: Settings, store_id: str) -> tuple[list[KeyRecord], list[DeletedKey]]:
    meta: MetadataStore = bootstrap.open_metadata_store(settings)
    try:
        return list(meta.keys_in_store(store_id)), list(meta.deleted_keys(store_id))
    finally:
        meta.close()


def labels_of(backend: HsmBackend) -> list[str]:
    return [info.label for info in backend.list_keys()]


def labels_via_pkcs11_tool(softhsm_conf: Path | None, token_label: str, pin: str) -> list[str]:
    """Secret-key labels on the token, read by OpenSC's pkcs11-tool in its own process: one entry
    per object, so a label two objects carry appears twice ("" for an object without a label).

    `softhsm_conf` None: the SoftHSM2 configuration of this process's environment.
    Through the CloudHSM stand-in (HSMBRIDGE_TEST_HSM=cloudhsm-shim) the cluster is CloudHSM,
    which makes a key in one step: a key a killed process left half-written in the SoftHSM2
    underneath (no label, no id, no value) is no key there, and the stand-in's searches never
    show it, so neither does this witness."""
    objects = pkcs11_tool.secret_key_objects(token_label, pin, softhsm_conf=softhsm_conf)
    if run_hsm() == "cloudhsm-shim":
        objects = [o for o in objects if o.label or o.id or "length" in o.header]
    return [o.label or "" for o in objects]
