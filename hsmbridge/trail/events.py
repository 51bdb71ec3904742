"""Structured audit events and where they go.

Owns: the `AuditEvent` record and its one wire form (`to_json`: CloudTrail-style camelCase field
names, see `AuditEvent.to_dict`), the `AuditSink` Protocol, a JSON-lines file sink flushed per
event (the CLI's) and the null sink; the server's buffered sink is in `sinks.py`, the tests'
in-memory one in tests/harness.py.
Events carry identifiers and outcomes only: never plaintext, data keys, passwords or PINs
(`redact()` enforces it for request parameters). Must not import metadata, backend or anything
above.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

# The one list of member names the trail never carries in clear, wherever they appear (the edges
# also hide every blob and every member the service model marks sensitive).
SECRET_MEMBERS = frozenset(
    {
        "AccessKeyId",
        "CiphertextBlob",
        "CiphertextForRecipient",
        "GrantTokens",
        "KeyStorePassword",
        "Password",
        "Plaintext",
        "PrivateKeyPlaintext",
        "RawSecretAccessKey",
        "XksProxyAuthenticationCredential",
    }
)
REDACTED = "<redacted>"


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Request parameters with every secret or blob member replaced by a marker."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in SECRET_MEMBERS or isinstance(value, bytes | bytearray):
            out[name] = REDACTED
        elif isinstance(value, Mapping):
            out[name] = redact(value)
        elif isinstance(value, list):
            out[name] = [redact(v) if isinstance(v, Mapping) else v for v in value]
        else:
            out[name] = value
    return out


API_CALL = "AwsApiCall"
SERVICE_EVENT = "AwsServiceEvent"  # e.g. the end-of-waiting-period DeleteKey, as CloudTrail


def iso_time(epoch_s: float) -> str:
    """CloudTrail's eventTime format, with milliseconds: 2024-05-01T12:00:00.123Z."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class AuditEvent:
    """One audit record. Python names here; `to_dict` gives the camelCase wire names."""

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

    def to_dict(self) -> dict[str, Any]:
        """The JSON-lines record. Names follow CloudTrail where it has a flat field (eventTime,
        eventName, eventType, sourceIPAddress, requestParameters, errorCode,
        additionalEventData); the rest are hsmbridge's own, flat so that `jq` needs no paths.
        Every field is always present (null when unknown) so each line has one schema."""
        extra = dict(self.additional)
        # Service events say what they are in their extras (keys.py's DeleteKey); lift it.
        event_type = extra.pop("eventType", API_CALL)
        event_source = extra.pop("eventSource", "kms.amazonaws.com")  # STS calls name theirs
        latency = None if self.hsm_latency_ms is None else round(self.hsm_latency_ms, 3)
        return {
            "eventTime": iso_time(self.event_time),
            "eventName": self.event_name,
            "eventType": event_type,
            "eventSource": event_source,
            "requestId": self.request_id,
            "principalArn": self.principal_arn,
            "sourceIPAddress": self.source_ip,
            "requestParameters": dict(self.request_parameters),
            "keyArn": self.key_arn,
            "customKeyStoreId": self.custom_key_store_id,
            "errorCode": self.error_code,
            "hsmLatencyMs": latency,
            "additionalEventData": extra,
        }

    def to_json(self) -> str:
        # default=str: a stray non-JSON value in the extras must not lose the whole event.
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


class NullSink:
    def emit(self, event: AuditEvent) -> None:
        return None


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
