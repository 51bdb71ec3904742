"""Structured logging: the request id on every record emitted while a request is served.

Owns: `RequestIdFilter` (sets `record.request_id` from the request scope in `trail.context`; "-"
outside a request), `JsonFormatter` (one JSON object per line: time, level, logger, message,
request id, thread, and the exception type with its traceback), and `configure_logging()`, which
the CLI calls once. The request scope is a contextvar that the app copies into the worker thread,
so records from the service and the backend carry the id of the request they work for.
Must not import uvicorn, pkcs11 or the service layer.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Final

from hsmbridge.trail import context
from hsmbridge.trail.events import iso_time

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Attach to handlers (not loggers: logger filters do not see records of child loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = context.current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "requestId": getattr(record, "request_id", None) or context.current_request_id(),
            "thread": record.threadName,
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: int = logging.WARNING, *, json_format: bool = False) -> None:
    """Route hsmbridge's logs to stderr, with the request id, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
