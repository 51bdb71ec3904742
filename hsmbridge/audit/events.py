"""Structured audit events and where they go.

Owns: the `AuditEvent` record (CloudTrail-like field names), the `AuditSink` Protocol, a JSON-lines
file sink and an in-memory sink for tests. Events carry identifiers and outcomes only: never
plaintext, data keys, passwords or PINs (`redact()` enforces it for request parameters).
Must not import metadata, backend or anything above.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

SECRET_MEMBERS = frozenset(
    {
        "Plaintext",
        "KeyStorePassword",
        "Password",
        "CiphertextBlob",
        "CiphertextForRecipient",
        "GrantTokens",
        "RawSecretAccessKey",
        "XksProxyAuthenticationCredential",
    }
)


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Request parameters with every secret or blob member replaced by a marker."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in SECRET_MEMBERS or isinstance(value, bytes | bytearray):
            out[name] = "<redacted>"
        elif isinstance(value, Mapping):
            out[name] = redact(value)
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class AuditEvent:
    event_name: str
    event_time: float = field(default_factory=time.time)
    request_id: str | None = None
    principal_arn: str | None = None
    source_ip: str | None = None
    request_parameters: Mapping[str, Any] = field(default_factory=dict)
    key_arn: str | None = None
    custom_key_store_id: str | None = None
    error_code: str | None = None
    hsm_latency_ms: float | None = None
    additional: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


class NullSink:
    def emit(self, event: AuditEvent) -> None:
        return None


class MemorySink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


class JsonLinesSink:
    """Appends one JSON object per line; the file is created 0600."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")

    def emit(self, event: AuditEvent) -> None:
        line = event.to_json() + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()
