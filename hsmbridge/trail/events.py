"""Structured audit events and where they go.

Owns: the `AuditEvent` record and its one wire form (`to_json`: CloudTrail-style camelCase field
names, see `AuditEvent.to_dict`), the bound on one line of it (`bounded_json`: what every file
sink writes), the `AuditSink` Protocol, a JSON-lines file sink flushed per event (the CLI's) and
the null sink; the server's buffered sink is in `sinks.py`, the tests' in-memory one in
tests/harness.py.
Events carry identifiers and outcomes only: never plaintext, data keys, passwords or PINs
(`redact()` enforces it for request parameters). Must not import metadata, backend or anything
above.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from hsmbridge.config import AuditSettings

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
    second = math.floor(epoch_s)
    micros = round((epoch_s - second) * 1_000_000)  # as datetime.fromtimestamp rounds
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_second_prefix(second)}{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_prefix(second: int) -> str:
    """`2024-05-01T12:00:00.` for one whole second: events come thousands a second, and formatting
    the date showed in the per-request profile."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


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
        """The whole record, unbounded; file sinks write `bounded_json(event, cap)` instead."""
        return _dumps(self.to_dict())


# The smallest line cap `bounded_json` honours: its last-resort record always fits in it.
MIN_ENTRY_BYTES: Final = 1024
_CLIP_CHARS: Final = 128  # a string field kept when the record still does not fit (stage 3)
_BARE_CHARS: Final = 16  # the names a bare record keeps (stage 4)


def bounded_json(event: AuditEvent, max_bytes: int) -> str:
    """The event's JSON, at most `max_bytes - 1` bytes so that the line with its newline fits.

    An oversized record (a hostile 1 MiB parameter) shrinks in stages, stopping at the first that
    fits: its requestParameters become `{"truncated": true, "originalBytes": N}`, then its
    additionalEventData do, then every string field is clipped, and last a bare record keeps only
    the time and clipped names. Every field stays present, so the line keeps its schema.
    """
    line = event.to_json()
    if len(line) < max_bytes:  # json.dumps escapes to ASCII: characters are bytes
        return line
    record = event.to_dict()
    for shrink in (_truncate_parameters, _truncate_additional, _clip_strings, _bare):
        shrink(record)
        line = _dumps(record)
        if len(line) < max_bytes:
            break
    return line


# Datetimes and dataclasses go to `default=str` as with `json`.
_ORJSON_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _dumps(record: Mapping[str, Any]) -> str:
    # default=str: a stray non-JSON value in the extras must not lose the whole event. orjson
    # (C) on the hot path, ASCII-escaped afterwards only when needed so that the line stays
    # ASCII, as `bounded_json` counts characters as bytes; `json` for what orjson refuses (an
    # unpaired surrogate, a non-string key).
    try:
        line = orjson.dumps(record, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return json.dumps(record, separators=(",", ":"), default=str)
    return line if line.isascii() else json.dumps(json.loads(line), separators=(",", ":"))


def _truncated(value: Any) -> dict[str, Any]:
    return {"truncated": True, "originalBytes": len(_dumps(value))}


def _truncate_parameters(record: dict[str, Any]) -> None:
    record["requestParameters"] = _truncated(record["requestParameters"])


def _truncate_additional(record: dict[str, Any]) -> None:
    record["additionalEventData"] = _truncated(record["additionalEventData"])


def _clip_strings(record: dict[str, Any]) -> None:
    for name, value in record.items():
        if isinstance(value, str) and len(value) > _CLIP_CHARS:
            record[name] = value[:_CLIP_CHARS] + "..."


def _bare(record: dict[str, Any]) -> None:
    # Escaping may make a character 6 bytes: only a few short fields fit MIN_ENTRY_BYTES surely.
    kept = ("eventName", "eventType", "eventSource")
    for name, value in record.items():
        if isinstance(value, str) and name != "eventTime":
            record[name] = value[:_BARE_CHARS] if name in kept else None


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None: ...


class NullSink:
    def emit(self, event: AuditEvent) -> None:
        return None


class JsonLinesSink:
    """Appends one JSON object per line, each at most `limits.max_entry_bytes`; the file is
    created 0600. It never rotates the file: the server's sink does (see `trail.rotation`), and a
    line written here after a rotation lands in the renamed file."""

    def __init__(self, path: Path, limits: AuditSettings | None = None) -> None:
        self._path = path
        self._max_entry_bytes = max((limits or AuditSettings()).max_entry_bytes, MIN_ENTRY_BYTES)
        self._lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")

    def emit(self, event: AuditEvent) -> None:
        line = bounded_json(event, self._max_entry_bytes) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()
