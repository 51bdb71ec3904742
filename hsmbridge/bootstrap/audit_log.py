"""The audit trail file the configuration names (`[paths] audit_log`), opened after start-up checks.

Owns: `open_audit_log` (write-through, for one-shot CLI commands: every event is on disk when the
command exits) and `open_buffered_audit_log` (the server's: flushed every second and on close, no
syscall on the request path; it also rotates the file and rate-limits the events of unauthenticated
requests, as `[audit]` says). Both run `prepare` first, so an exposed secret is refused before the
audit file is created and the data directory exists when it is. The caller closes the sink.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from hsmbridge.bootstrap.host import prepare
from hsmbridge.config import Settings
from hsmbridge.trail.events import JsonLinesSink
from hsmbridge.trail.sinks import BufferedJsonLinesSink


def open_audit_log(settings: Settings) -> JsonLinesSink:
    prepare(settings)
    return JsonLinesSink(settings.audit_log, settings.audit)


def open_buffered_audit_log(settings: Settings) -> BufferedJsonLinesSink:
    prepare(settings)
    return BufferedJsonLinesSink(settings.audit_log, limits=settings.audit)
