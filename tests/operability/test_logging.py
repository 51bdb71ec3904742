"""Structured logs: every record emitted while serving a request carries its request id, in the
event-loop thread and in the worker thread alike; the JSON formatter writes one object per line."""

from __future__ import annotations

import json
import logging

import pytest

from hsmbridge.http.logs import JsonFormatter, RequestIdFilter, configure_logging
from hsmbridge.trail.context import RequestScope, request_scope


def test_records_from_the_worker_thread_carry_the_request_id(live, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="hsmbridge")
    key = live.create_key()
    # Drop this process's login so the next request logs in again and says so from the worker.
    live.runtime.service.ctx.connections.detach(live.store_id)
    caplog.clear()
    resp = live.kms.encrypt(KeyId=key["KeyId"], Plaintext=b"log me")
    request_id = resp["ResponseMetadata"]["RequestId"]
    login = [r for r in caplog.records if r.getMessage().startswith("logged in to cluster")]
    assert login
    assert {r.request_id for r in login} == {request_id}
    assert all(r.threadName.startswith("hsmbridge-hsm") for r in login)  # the HSM pool


pytestmark = pytest.mark.softhsm


def test_records_outside_a_request_get_a_dash():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    RequestIdFilter().filter(record)
    assert record.request_id == "-"


def test_json_formatter_one_object_per_line_with_request_id():
    formatter = JsonFormatter()
    with request_scope(RequestScope("req-123")):
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord(
                "hsmbridge.x", logging.ERROR, __file__, 1, "failed %s", ("op",), None
            )
            import sys

            record.exc_info = sys.exc_info()
        line = formatter.format(record)
    doc = json.loads(line)
    assert "\n" not in line
    assert doc["requestId"] == "req-123"
    assert doc["message"] == "failed op"
    assert doc["level"] == "ERROR"
    assert doc["exception"] == "ValueError"
    assert doc["time"].endswith("Z")


def test_configure_logging_installs_the_filter(capsys):
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        configure_logging(logging.INFO, json_format=True)
        with request_scope(RequestScope("req-9")):
            logging.getLogger("hsmbridge.test").info("hello")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    doc = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert doc["requestId"] == "req-9"
    assert doc["message"] == "hello"
