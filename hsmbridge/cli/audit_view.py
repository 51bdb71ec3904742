"""How `hsmbridge audit` prints: findings as a table, JSON or CSV, HSM keys, and a progress bar.

Owns: the audit's output formats (data to stdout) and the stderr progress bar. No secret reaches
this module: findings and HSM key descriptions hold identifiers and attributes only.
"""

from __future__ import annotations

import csv
import enum
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from hsmbridge.audit import AuditReport, OrphanDeletion
from hsmbridge.cli.output import print_json, print_table

FINDING_COLUMNS = ("severity", "kind", "key_id", "handle", "label", "detail")
CSV_COLUMNS = ("severity", "kind", "key_id", "arn", "handle", "label", "detail")
DELETION_COLUMNS = ("outcome", "handle", "key_id", "label", "reason")


class AuditFormat(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


def default_format(out: TextIO) -> AuditFormat:
    """A table for people at a terminal, JSON for pipes and CI."""
    return AuditFormat.TABLE if out.isatty() else AuditFormat.JSON


def print_report(report: AuditReport, fmt: AuditFormat, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    rows = [f.to_dict() for f in report.findings]
    if fmt is AuditFormat.JSON:
        print_json(report.to_dict(), stream)
    elif fmt is AuditFormat.CSV:
        write_csv(rows, CSV_COLUMNS, stream)
    elif rows:
        print_table(rows, FINDING_COLUMNS, stream)
    else:
        stream.write("No findings.\n")


def summary_line(report: AuditReport) -> str:
    scope = report.scope
    where = scope.custom_key_store_id or scope.cluster_id
    worst = f", worst {report.max_severity}" if report.max_severity is not None else ""
    return (
        f"audited {report.hsm_objects} HSM object(s) against {report.kms_keys} KMS key(s) of "
        f"{where} ({report.source}) in {report.duration_s:.2f}s: "
        f"{len(report.findings)} finding(s){worst}"
    )


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


def print_keys(
    keys: Sequence[Mapping[str, Any]], fmt: AuditFormat, out: TextIO | None = None
) -> None:
    """`audit find`: one block of attribute/value lines per key (like `key list --verbose`)."""
    stream = out or sys.stdout
    if fmt is AuditFormat.JSON:
        print_json({"keys": list(keys)}, stream)
        return
    if fmt is AuditFormat.CSV:
        columns = list(keys[0]) if keys else ["handle", "label", "key_id"]
        write_csv([{**k, "violations": "; ".join(k["violations"])} for k in keys], columns, stream)
        return
    if not keys:
        stream.write("No HSM key carries this label.\n")
    for key in keys:
        rows = [{"attribute": name, "value": _cell(value)} for name, value in key.items()]
        print_table(rows, ("attribute", "value"), stream)
        stream.write("\n")


def _cell(value: object) -> str:
    if isinstance(value, list):
        return "; ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def print_deletions(
    outcomes: Sequence[OrphanDeletion], dry_run: bool, fmt: AuditFormat, out: TextIO | None = None
) -> None:
    stream = out or sys.stdout
    rows = [
        {**o.finding.to_dict(), "outcome": o.outcome.value, "reason": o.reason} for o in outcomes
    ]
    if fmt is AuditFormat.JSON:
        print_json({"dryRun": dry_run, "orphans": rows}, stream)
    elif fmt is AuditFormat.CSV:
        write_csv(rows, (*DELETION_COLUMNS, "arn", "detail"), stream)
    elif rows:
        print_table(rows, DELETION_COLUMNS, stream)
    else:
        stream.write("No orphaned key material.\n")


class StderrProgress:
    """A one-line progress bar on stderr, redrawn at most every 0.1 s."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._last = 0.0
        self._phase = ""
        self._drawn = False

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if phase == self._phase and not finished and now - self._last < 0.1:
            return
        if phase != self._phase and self._drawn:
            self._stream.write("\n")
        self._phase, self._last = phase, now
        self._stream.write("\r" + _bar(phase, done, total, self.WIDTH))
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def _bar(phase: str, done: int, total: int | None, width: int) -> str:
    if not total:
        return f"{phase}..."
    filled = width * done // total
    return f"{phase} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
