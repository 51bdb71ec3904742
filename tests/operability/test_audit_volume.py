"""The server's audit file under hostile volume (`BufferedJsonLinesSink` over `trail.rotation`).

Each line is capped, events of requests refused before authentication are rate-limited with a
summary of what was dropped, and the file rotates by size, safely when several server processes
append to it. Real files in tmp_path; clocks are injected; the flusher thread is parked (one-hour
interval) unless a test is about it, and the tests flush and check the file themselves.
"""

from __future__ import annotations

import json
import multiprocessing
import stat
import time
from pathlib import Path
from typing import Any

from hsmbridge.config import AuditSettings
from hsmbridge.trail.events import MIN_ENTRY_BYTES, AuditEvent, JsonLinesSink, bounded_json
from hsmbridge.trail.rotation import audit_files, read_lines
from hsmbridge.trail.sinks import BufferedJsonLinesSink

PRINCIPAL = "arn:aws:iam::111122223333:user/tester"
KEY_ARN = "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PARKED = 3600.0  # flush interval that keeps the flusher thread out of a test


class FakeClock:
    """The sink's monotonic clock, moved by the test. (Not tests.harness's: the processes this
    module spawns import it, and should not import the whole harness.)"""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def signed(n: int, pad: int = 0) -> AuditEvent:
    params = {"KeyId": KEY_ARN, "pad": "p" * pad}
    return AuditEvent(
        "Encrypt", request_id=f"r-{n}", principal_arn=PRINCIPAL, request_parameters=params
    )


def unsigned(n: int) -> AuditEvent:
    return AuditEvent(
        "Encrypt", request_id=f"u-{n}", error_code="MissingAuthenticationTokenException"
    )


# --- one line at most max_entry_bytes -------------------------------------------------------------


def test_a_megabyte_parameter_is_truncated_and_every_other_field_kept(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = BufferedJsonLinesSink(path, flush_interval_s=PARKED)
    event = AuditEvent(
        "CreateKey",
        event_time=0.0,
        request_id="r-1",
        principal_arn=PRINCIPAL,
        source_ip="203.0.113.9",
        request_parameters={"Description": "d" * (1 << 20), "KeyUsage": "ENCRYPT_DECRYPT"},
        key_arn=KEY_ARN,
        custom_key_store_id="cks-1234567890abcdef0",
        error_code="ValidationException",
        hsm_latency_ms=1.5,
        additional={"status": 400},
    )
    sink.emit(event)
    sink.close()
    [line] = path.read_bytes().splitlines(keepends=True)
    assert len(line) <= AuditSettings().max_entry_bytes == 16 * 1024
    record = json.loads(line)
    original = len(json.dumps(dict(event.request_parameters), separators=(",", ":")))
    assert record["requestParameters"] == {"truncated": True, "originalBytes": original}
    assert original > 1 << 20
    expected = event.to_dict()
    del expected["requestParameters"], record["requestParameters"]
    assert record == expected
    assert record["additionalEventData"] == {"status": 400}


def test_an_event_that_fits_is_written_whole() -> None:
    event = signed(1, pad=15_000)
    assert bounded_json(event, 16 * 1024) == event.to_json()


def test_oversized_additional_data_is_truncated_next() -> None:
    event = AuditEvent(
        "ReEncrypt",
        request_id="r-1",
        request_parameters={"pad": "p" * 5000},
        additional={"otherKeyArns": [KEY_ARN] * 200, "eventType": "AwsApiCall"},
    )
    record = json.loads(bounded_json(event, 4096))
    assert record["requestParameters"]["truncated"] is True
    assert record["additionalEventData"]["truncated"] is True
    assert (record["eventName"], record["requestId"], record["eventType"]) == (
        "ReEncrypt", "r-1", "AwsApiCall",
    )  # fmt: skip


def test_even_an_absurd_event_fits_the_smallest_cap() -> None:
    huge = "\U0001f600" * 50_000  # escapes to 12 bytes a character
    event = AuditEvent(
        huge, request_id=huge, principal_arn=huge, source_ip=huge, key_arn=huge,
        custom_key_store_id=huge, error_code=huge, request_parameters={huge: huge},
        additional={"eventType": huge, "eventSource": huge, huge: huge},
    )  # fmt: skip
    line = bounded_json(event, MIN_ENTRY_BYTES)
    assert len(line) < MIN_ENTRY_BYTES
    record = json.loads(line)
    assert set(record) == set(event.to_dict())  # one schema, always
    assert record["eventName"] == huge[:16]


def test_the_cli_sink_caps_lines_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonLinesSink(path, AuditSettings(max_entry_bytes=2048))
    sink.emit(signed(1, pad=1 << 20))
    sink.close()
    [line] = path.read_bytes().splitlines(keepends=True)
    assert len(line) <= 2048
    assert json.loads(line)["requestParameters"]["truncated"] is True


# --- unauthenticated events: a token bucket and a summary -----------------------------------------


def _kinds(written: list[dict[str, Any]]) -> list[str]:
    """'u' for an unauthenticated request's event, 'r' for a signed one, '' for others."""
    return [(e["requestId"] or "")[:1] for e in written]


def test_unauthenticated_flood_is_limited_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = FakeClock(100.0)
    sink = BufferedJsonLinesSink(path, flush_interval_s=PARKED, clock=clock)
    try:
        for i in range(1000):
            sink.emit(unsigned(i))
            if i % 10 == 0:
                sink.emit(signed(i))  # authenticated events are never dropped
        sink.emit(AuditEvent("DeleteKey", key_arn=KEY_ARN))  # the service's own: not limited
        sink.flush()
        written = records(path)
        assert _kinds(written).count("u") == 20  # the burst: one second's worth
        assert _kinds(written).count("r") == 100
        assert sum(e["eventName"] == "DeleteKey" for e in written) == 1
        [summary] = [e for e in written if e["eventName"] == "AuditEventsSuppressed"]
        assert summary["additionalEventData"] == {
            "suppressed": 980,
            "reason": "unauthenticated requests over the audit rate limit",
        }
        assert summary["eventType"] == "AwsServiceEvent"
        assert summary["principalArn"] is None

        # Half a second later: ten new tokens; the next summary waits for its second.
        clock.advance(0.5)
        for i in range(1000, 1100):
            sink.emit(unsigned(i))
        sink.flush()
        assert len(records(path)) == len(written) + 10
        clock.advance(0.5)
        sink.flush()
        latest = records(path)[-1]
        assert latest["eventName"] == "AuditEventsSuppressed"
        assert latest["additionalEventData"]["suppressed"] == 90
    finally:
        sink.close()


def test_close_writes_the_pending_summary(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = BufferedJsonLinesSink(
        path,
        flush_interval_s=PARKED,
        limits=AuditSettings(unauthenticated_per_s=2),
        clock=FakeClock(),
    )
    sink.flush()  # a summary that is due finds nothing to report
    for i in range(5):
        sink.emit(unsigned(i))
    sink.close()
    written = records(path)
    assert [e["requestId"] for e in written[:2]] == ["u-0", "u-1"]
    assert written[2]["additionalEventData"]["suppressed"] == 3
    assert len(written) == 3


# --- rotation by size -----------------------------------------------------------------------------


def _emit_batches(sink: BufferedJsonLinesSink, batches: int, per_batch: int) -> None:
    for b in range(batches):
        for i in range(per_batch):
            sink.emit(signed(b * per_batch + i, pad=300))
        sink.flush()
        sink.check_file()


def _request_ids(path: Path) -> list[str]:
    return [e["requestId"] for e in records(path)]


def test_rotation_keeps_every_line_in_order_across_the_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    limits = AuditSettings(max_bytes=8 * 1024, backups=10)
    sink = BufferedJsonLinesSink(path, flush_interval_s=PARKED, limits=limits)
    _emit_batches(sink, batches=6, per_batch=25)  # ~12 KiB a batch: each one rotates
    sink.emit(signed(150))
    sink.close()
    assert [p.name for p in audit_files(path)] == [
        "audit.jsonl.6", "audit.jsonl.5", "audit.jsonl.4", "audit.jsonl.3", "audit.jsonl.2",
        "audit.jsonl.1", "audit.jsonl",
    ]  # fmt: skip
    assert _request_ids(path) == [f"r-{n}" for n in range(151)]
    for file in [*audit_files(path), path.with_name("audit.jsonl.lock")]:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert path.stat().st_size < 8 * 1024


def test_rotation_keeps_at_most_backups_old_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    limits = AuditSettings(max_bytes=8 * 1024, backups=2)
    sink = BufferedJsonLinesSink(path, flush_interval_s=PARKED, limits=limits)
    _emit_batches(sink, batches=6, per_batch=25)
    sink.close()
    assert [p.name for p in audit_files(path)] == ["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    # The oldest batches went with the deleted files; the newest two are whole, in order.
    assert _request_ids(path) == [f"r-{n}" for n in range(100, 150)]


def test_a_file_under_the_limit_is_not_rotated(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = BufferedJsonLinesSink(path, flush_interval_s=PARKED)
    _emit_batches(sink, batches=3, per_batch=25)
    sink.close()
    assert audit_files(path) == [path]
    assert not path.with_name("audit.jsonl.lock").exists()


def test_the_flusher_thread_rotates_without_being_asked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    limits = AuditSettings(max_bytes=1024)
    sink = BufferedJsonLinesSink(path, flush_interval_s=0.01, limits=limits)
    try:
        for i in range(10):
            sink.emit(signed(i, pad=300))
        deadline = 500
        while not path.with_name("audit.jsonl.1").exists():
            deadline -= 1
            assert deadline, "the flusher never rotated the file"
            time.sleep(0.01)
    finally:
        sink.close()
    assert _request_ids(path) == [f"r-{n}" for n in range(10)]


def test_another_sink_notices_the_rotation_and_reopens(tmp_path: Path) -> None:
    """Two sinks on one path stand for two server processes (each has its own descriptor)."""
    path = tmp_path / "audit.jsonl"
    limits = AuditSettings(max_bytes=4 * 1024, backups=5)
    rotator = BufferedJsonLinesSink(path, flush_interval_s=PARKED, limits=limits)
    other = BufferedJsonLinesSink(path, flush_interval_s=PARKED, limits=limits)
    try:
        _emit_batches(rotator, batches=1, per_batch=20)  # over the limit: rotated
        assert path.with_name("audit.jsonl.1").exists()
        other.emit(signed(20))
        other.flush()  # written before its check: lands in the renamed file, not lost
        other.check_file()  # notices the path names a new file and reopens it
        other.emit(signed(21))
        other.flush()
        path.unlink()  # an operator moved the file away: the next check recreates it
        other.check_file()
        other.emit(signed(22))
        other.flush()
    finally:
        rotator.close()
        other.close()
    first = [e["requestId"] for e in records(path.with_name("audit.jsonl.1"))]
    assert first == [f"r-{n}" for n in range(21)]
    assert _request_ids(path) == [*first, "r-22"]  # r-21's file was unlinked by the operator
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- several processes, one file ------------------------------------------------------------------

PROCESS_LINES = 1500


def _write_numbered(path_text: str, worker: int) -> None:
    """One server process: its own sink on the shared path, numbered authenticated events."""
    limits = AuditSettings(max_bytes=16 * 1024, backups=500)
    sink = BufferedJsonLinesSink(Path(path_text), flush_interval_s=0.002, limits=limits)
    try:
        for n in range(PROCESS_LINES):
            sink.emit(
                AuditEvent(
                    "Encrypt",
                    request_id=f"w{worker}-{n}",
                    principal_arn=PRINCIPAL,
                    request_parameters={"pad": "p" * 300},
                )
            )
            if n % 10 == 0:
                time.sleep(0.001)  # spread the writes over many flusher ticks
    finally:
        sink.close()


def test_processes_sharing_the_file_rotate_it_without_losing_or_tearing_a_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    spawn = multiprocessing.get_context("spawn")  # no fork of a threaded pytest process
    workers = [spawn.Process(target=_write_numbered, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    files = audit_files(path)
    assert len(files) >= 5, "the test did not rotate the file"
    seen: list[str] = []
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        for line in file.read_text(encoding="utf-8").splitlines():
            seen.append(json.loads(line)["requestId"])  # a torn line would not parse
    expected = [f"w{w}-{n}" for w in range(3) for n in range(PROCESS_LINES)]
    assert sorted(seen) == sorted(expected)  # every line exactly once
    for w in range(3):  # and each process's lines in the order it wrote them
        mine = [r for r in seen if r.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{n}" for n in range(PROCESS_LINES)]


# --- reading the trail back -----------------------------------------------------------------------


def test_readers_see_the_rotated_files_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for name, text in [
        ("audit.jsonl.12", "twelve\n"), ("audit.jsonl.5", "five\n"), ("audit.jsonl.1", "one\n"),
        ("audit.jsonl", "current\n"), ("audit.jsonl.lock", "lock\n"), ("audit.jsonl.2.gz", "gz\n"),
        ("audit.jsonl.bak", "bak\n"), ("other.jsonl.3", "other\n"),
    ]:  # fmt: skip
        (tmp_path / name).write_text(text)
    assert list(read_lines(path)) == ["twelve", "five", "one", "current"]
    path.unlink()
    assert [p.name for p in audit_files(path)] == [
        "audit.jsonl.12",
        "audit.jsonl.5",
        "audit.jsonl.1",
    ]
