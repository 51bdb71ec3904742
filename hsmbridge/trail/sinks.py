"""Audit sinks for the server: a buffered JSON-lines file and the request-aware wrapper.

Owns:
- `BufferedJsonLinesSink`: the server's audit file. An event costs one `json.dumps` and an append
  to a 64 KiB userspace buffer under a lock; a daemon thread writes the buffer to the kernel at
  least every `flush_interval_s` (1 s by default) and `close()` writes the rest. No fsync: the
  trade-off is that a crash of the process (not only of the machine) may lose up to one flush
  interval of events, in exchange for no syscall on the request path at ~5,000 req/s.
  It bounds what hostile volume can cost (`AuditSettings`): each line is at most
  `max_entry_bytes` (`events.bounded_json`); events of requests refused before authentication
  pass a per-process token bucket and the rest are counted into one `AuditEventsSuppressed` line
  per second at most; the flusher thread rotates the file by size (`trail.rotation`).
- `RequestAwareSink`: wraps the sink handed to the service. A service event that describes the
  request being served (CreateKey inside a CreateKey call) is folded into that request's one
  event via `trail.context.attach`; anything else (the sweeper's DeleteKey, the CLI's CreateKey)
  is emitted as its own event.
Must not import metadata, backend or anything above.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from hsmbridge.config import AuditSettings
from hsmbridge.ratelimit import TokenBucket
from hsmbridge.trail import context, rotation
from hsmbridge.trail.events import (
    MIN_ENTRY_BYTES,
    SERVICE_EVENT,
    AuditEvent,
    AuditSink,
    bounded_json,
)

log = logging.getLogger(__name__)

BUFFER_BYTES: Final = 64 * 1024
SUPPRESSED_EVENT: Final = "AuditEventsSuppressed"
SUPPRESSED_REASON: Final = "unauthenticated requests over the audit rate limit"
SUMMARY_INTERVAL_S: Final = 1.0


def is_unauthenticated(event: AuditEvent) -> bool:
    """A request's event without a principal: refused before its signature was verified.
    Service events (no request id: the sweeper's DeleteKey) are the server's own, never limited."""
    return event.principal_arn is None and event.request_id is not None


class BufferedJsonLinesSink:
    """Appends one JSON object per line to a 0600 file, flushed periodically and on close."""

    def __init__(
        self,
        path: Path,
        *,
        flush_interval_s: float = 1.0,
        limits: AuditSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or AuditSettings()
        if self.limits.max_entry_bytes < MIN_ENTRY_BYTES:
            raise ValueError(f"max_entry_bytes must be at least {MIN_ENTRY_BYTES}")
        self._fd = rotation.open_append(self.path)
        self._buffer = bytearray()
        # WARNING: held for appends and writes only, never while waiting for the rotation flock,
        # so that a rotation in another process never stalls a request.
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()  # one rotation check at a time
        self._open = True
        self._clock = clock
        self._bucket = TokenBucket(self.limits.unauthenticated_per_s, clock())
        self._suppressed = 0
        self._summarised_at = -SUMMARY_INTERVAL_S
        self._closed = threading.Event()
        self._interval = flush_interval_s
        self._flusher = threading.Thread(target=self._flush_loop, name="audit-flusher", daemon=True)
        self._flusher.start()

    def emit(self, event: AuditEvent) -> None:
        if is_unauthenticated(event):
            with self._lock:
                if self._bucket.available(self._clock()) < 1:
                    self._suppressed += 1
                    return
                self._bucket.take()
        # Serialised outside the lock: the lock guards the buffer.
        line = (bounded_json(event, self.limits.max_entry_bytes) + "\n").encode()
        with self._lock:
            if self._open:
                self._buffer += line
                if len(self._buffer) >= BUFFER_BYTES:
                    self._write_locked()

    def flush(self) -> None:
        """Write the buffer (and a due suppression summary) to the kernel."""
        with self._lock:
            if self._open:
                self._summarise_locked(force=False)
                self._write_locked()

    def check_file(self) -> None:
        """Rotate the file if it is over `max_bytes`, or reopen the path if another process
        rotated it. The flusher thread runs it after each flush; it may wait for another process's
        rotation, which is why it is not on the request path."""
        with self._check_lock:
            with self._lock:
                if not self._open:
                    return
                held = self._fd
                # A duplicate, so that a concurrent close() cannot hand the number to another file.
                probe = os.dup(held)
            try:
                new = rotation.follow(
                    self.path, probe, max_bytes=self.limits.max_bytes, backups=self.limits.backups
                )
            finally:
                os.close(probe)
            if new is not None:
                self._switch(held, new)

    def _switch(self, held: int, new: int) -> None:
        with self._lock:
            if not self._open:
                os.close(new)
                return
            self._write_locked()  # what was buffered meanwhile still belongs to the old file
            self._fd = new
            os.close(held)

    def _write_locked(self) -> None:
        while self._buffer:
            # Whole lines in one write: O_APPEND keeps other processes' lines out of them.
            written = os.write(self._fd, self._buffer)
            del self._buffer[:written]

    def _summarise_locked(self, *, force: bool) -> None:
        now = self._clock()
        if not self._suppressed or (not force and now - self._summarised_at < SUMMARY_INTERVAL_S):
            return
        summary = AuditEvent(
            SUPPRESSED_EVENT,
            additional={
                "eventType": SERVICE_EVENT,
                "suppressed": self._suppressed,
                "reason": SUPPRESSED_REASON,
            },
        )
        self._buffer += (bounded_json(summary, self.limits.max_entry_bytes) + "\n").encode()
        self._suppressed = 0
        self._summarised_at = now

    def _flush_loop(self) -> None:
        while not self._closed.wait(self._interval):
            try:
                self.flush()
                self.check_file()
            except OSError:  # a full disk must not kill the flusher; the next tick retries
                log.exception("flushing the audit log %s failed", self.path)

    def close(self) -> None:
        self._closed.set()
        self._flusher.join(timeout=5)
        with self._lock:
            if self._open:
                self._open = False
                self._summarise_locked(force=True)
                try:
                    self._write_locked()
                finally:
                    os.close(self._fd)


class RequestAwareSink:
    """The sink the service emits to: folds same-action service events into the request's event."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner

    def emit(self, event: AuditEvent) -> None:
        folded = event.request_id is None and context.attach(
            event.event_name,
            key_arn=event.key_arn,
            custom_key_store_id=event.custom_key_store_id,
            additional=event.additional,
        )
        if not folded:
            self.inner.emit(event)
