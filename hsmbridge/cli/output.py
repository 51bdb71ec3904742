"""How the CLI prints results: JSON shaped like `aws kms` output (blobs base64), or a table.

Owns: the output formats behind one small interface. Data goes to stdout; messages to stderr.
"""

from __future__ import annotations

import base64
import enum
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


class OutputFormat(enum.StrEnum):
    JSON = "json"
    TABLE = "table"


def _default(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot print {type(value).__name__}")


def print_json(doc: Any, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    stream.write(json.dumps(doc, indent=4, default=_default) + "\n")


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO | None = None
) -> None:
    stream = out or sys.stdout
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    stream.write(
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n"
    )
    for row in cells:
        stream.write(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )


def emit(
    doc: Any,
    fmt: OutputFormat,
    rows: Sequence[Mapping[str, Any]] | None = None,
    columns: Sequence[str] = (),
) -> None:
    if fmt is OutputFormat.TABLE and rows is not None:
        print_table(rows, columns)
    else:
        print_json(doc)
