"""Keeps the benchmark harness (benchmarks/) from rotting: its smallest run, end to end.

Runs every phase (raw PKCS#11, service in-process, hsmbridge and moto_server over HTTP with the
Python load generator and with wrk, scale with the audit) with tiny sizes and a few hundred
requests, then checks the result files' shape and that every request succeeded. It never asserts
a timing: this machine is shared and the numbers mean nothing at this size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.softhsm]


def test_smallest_benchmark_run_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        sys.executable, "-m", "benchmarks.run", "--quick", "--keys", "5,15",
        "--concurrency", "1,4", "--seconds", "0.2", "--inproc-seconds", "0.1",
        "--max-requests", "40", "--no-profile", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()

    assert set(results["raw"]) >= {"keygen_persistent", "gcm_encrypt_32", "random_32"}
    assert set(results["service"]) == {"CreateKey", "Encrypt", "Decrypt", "GenerateDataKey"}
    sent = 0
    for side in ("http_hsmbridge", "http_moto"):
        for op in ("Encrypt", "Decrypt", "GenerateDataKey", "CreateKey"):
            for conc in ("1", "4"):
                phase = results[side][op][conc]
                assert phase["requests"] > 0, (side, op, conc)
                # Every request must succeed: a 4xx here means the harness signs wrongly.
                assert phase["ok"] == phase["requests"], (side, op, conc, phase["error_sample"])
                sent += phase["requests"]
    assert sent >= 100
    # The wrk phase (wrk comes with the test set-up): every request signed right, for both peers.
    for side in ("wrk_hsmbridge", "wrk_moto"):
        for op in ("Encrypt", "Decrypt", "GenerateDataKey"):
            for conc in ("1", "4"):
                phase = results[side][op][conc]
                assert phase["requests"] > 0, (side, op, conc)
                assert phase["non_2xx"] == 0, (side, op, conc, phase["error_sample"])
    assert "wrk (C client)" in report
    points = results["scale"]["points"]
    assert [p["keys"] for p in points] == [5, 15]
    assert points[-1]["fill"]["total"] >= 15
    assert results["scale"]["raw_enumeration"]["objects"] >= 15
    audit = results["scale"]["audit"]
    if audit["available"]:
        assert audit["exit_code"] == 0, audit  # bulk-loaded keys must audit clean
    statuses = {t["status"].split(" ")[0] for t in results["targets"]}
    assert statuses <= {"met", "missed", "not", "pending"}
    assert "## Targets" in report
    assert "loadavg_start" in results
