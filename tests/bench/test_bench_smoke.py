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

from benchmarks import instances
from benchmarks import report as bench_report

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
    # --docs keeps the "Several instances" section that benchmarks.instances wrote earlier.
    docs = tmp_path / "docs"
    docs.mkdir()
    kept = f"{bench_report.INSTANCES_START}\n## Several instances\n{bench_report.INSTANCES_END}"
    (docs / "benchmarks.md").write_text(f"# old report\n\n{kept}\n")
    bench_report.publish(results, out, docs)
    published = (docs / "benchmarks.md").read_text()
    assert "# old report" not in published
    assert published.rstrip().endswith(kept)


@pytest.mark.postgres
def test_smallest_instances_run_serves_every_setup(tmp_path: Path) -> None:
    """`benchmarks.instances` with one instance on SQLite and two on one PostgreSQL database (the
    full run adds one and three on PostgreSQL, the same code with another count): every request
    of every setup answered 2xx, and the docs section it writes survives a full run's
    `report.publish`."""
    out = tmp_path / "instances"
    argv = [
        sys.executable, "-m", "benchmarks.instances", "--seconds", "1", "--concurrency", "6",
        "--setups", "sqlite-1,postgresql-2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    setups = results["setups"]
    assert list(setups) == ["sqlite-1", "postgresql-2"]
    for name, setup in setups.items():
        for op in ("Encrypt", "GenerateDataKey", "CreateKey"):
            figures = setup[op]
            assert "error" not in figures, (name, op, figures)
            assert figures["rps"] > 0, (name, op)
            assert figures["non_2xx"] == 0, (name, op)
            assert len(figures["per_instance_rps"]) == int(name.rsplit("-", 1)[1])
            assert all(rate > 0 for rate in figures["per_instance_rps"]), (name, op)

    # --docs: the section is added once, and replaced (not repeated) by the next run.
    docs_file = tmp_path / "benchmarks.md"
    docs_file.write_text("# Benchmarks\n\nthe full run's report\n")
    section = (out / "report.md").read_text()
    instances.publish(section, docs_file)
    instances.publish(section.replace("Several instances", "Several instances (again)"), docs_file)
    text = docs_file.read_text()
    assert text.startswith("# Benchmarks\n\nthe full run's report\n")
    assert text.count(bench_report.INSTANCES_START) == 1
    assert text.count(bench_report.INSTANCES_END) == 1
    assert "Several instances (again)" in text
