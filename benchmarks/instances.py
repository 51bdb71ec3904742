"""Several instances: 1, 2 and 3 hsmbridge instances on one PostgreSQL database, against one on
SQLite, under the same wrk load.

    python -m benchmarks.instances [--seconds 6] [--concurrency 64] [--out DIR] [--docs]

Each instance is `hsmbridge serve --workers 1` on its own port over one environment (one
configuration, one SoftHSM2 token, one metadata database), as instances on several hosts in front
of one cluster would be, behind a load balancer: here the load is split evenly, one wrk per
instance with concurrency/N connections each, all running at once; throughput is their sum, p99
the worst instance's. PostgreSQL is a local server started for the run with durable settings
(fsync on, as SQLite runs with synchronous=FULL). Operations: Encrypt and GenerateDataKey (every
request reads its key and store rows: PostgreSQL has no read cache) and CreateKey (a write
under the database-wide write lock). With --docs the table replaces the "Several instances"
section of docs/benchmarks.md (`report.publish` keeps it across full runs).

What this machine can show: its 2 cores run PostgreSQL, every instance and wrk; more instances
add processes, not cores. The figures show what sharing one database costs per request and that
nothing serialises across instances except CreateKey's write lock; they cannot show scaling out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

from benchmarks import report, signing, wrk
from benchmarks.common import (
    LOOPBACK,
    PY,
    REPO,
    HsmEnv,
    Proc,
    free_port,
    loadavg,
    log,
    machine,
    spawn,
)
from benchmarks.run import wait_http

OPERATIONS: Final = ("Encrypt", "GenerateDataKey", "CreateKey")
SETUPS: Final = (("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3))
START, END = report.INSTANCES_START, report.INSTANCES_END


def init_env(root: Path, logs: Path, metadata_url: str | None) -> HsmEnv:
    argv = [PY, "-m", "hsmbridge", "init", "--data-dir", str(root)]
    if metadata_url:
        argv += ["--metadata-url", metadata_url]
    with (logs / "init.log").open("ab") as fh:
        subprocess.run(
            argv, check=True, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, timeout=120,
        )  # fmt: skip
    return HsmEnv(root, free_port())


def start_instances(env: HsmEnv, n: int, logs: Path) -> list[tuple[Proc, int]]:
    started: list[tuple[Proc, int]] = []
    try:
        for i in range(n):
            port = free_port()
            argv = [PY, "-m", "hsmbridge", "serve", "--config", str(env.config)]
            argv += ["--port", str(port), "--workers", "1"]
            proc = spawn(f"instance-{i}", argv, logs / f"instance-{n}-{i}.log")
            started.append((proc, port))
            wait_http(f"http://{LOOPBACK}:{port}/health", proc, 120)
    except BaseException:
        for proc, _ in started:
            proc.stop()
        raise
    return started


def _bodies(target: signing.Target) -> dict[str, signing.Body]:
    import boto3

    kms = boto3.client(
        "kms", endpoint_url=f"http://{LOOPBACK}:{target.port}", region_name=target.region,
        aws_access_key_id=target.access_key, aws_secret_access_key=target.secret_key,
    )  # fmt: skip
    store_id = kms.describe_custom_key_stores()["CustomKeyStores"][0]["CustomKeyStoreId"]
    key_id = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"][
        "KeyId"
    ]
    return {
        "Encrypt": signing.encrypt_body(key_id),
        "GenerateDataKey": signing.data_key_body(key_id),
        "CreateKey": signing.create_key_body(store_id),
    }


def measure(
    targets: list[signing.Target],
    operation: str,
    body: signing.Body,
    *,
    concurrency: int,
    seconds: int,
    work: Path,
) -> dict[str, Any]:
    """One wrk per instance, all at once; the sum of their rates, the worst p99."""
    each = max(1, concurrency // len(targets))
    results: list[dict[str, Any]] = [{} for _ in targets]

    def one(i: int) -> None:
        named = signing.Target(f"{targets[i].name}{i}", *_rest(targets[i]))
        try:
            results[i] = wrk.run(
                named, operation, body, pool_size=2000, concurrency=each, seconds=seconds,
                threads=1, work=work,
            )  # fmt: skip
        except RuntimeError as exc:
            results[i] = {"error": str(exc)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        return {"error": failed[0]}
    return {
        "rps": round(sum(r["rps"] for r in results), 1),
        "p50_ms": max(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
        "non_2xx": sum(r["non_2xx"] for r in results),
        "per_instance_rps": [r["rps"] for r in results],
        "connections_each": each,
    }


def _rest(target: signing.Target) -> tuple[int, str, str, str]:
    return target.port, target.access_key, target.secret_key, target.region


def parse_setups(text: str) -> tuple[tuple[str, int], ...]:
    """`sqlite-1,postgresql-2` -> the setups to run, each one of SETUPS."""
    known = {f"{engine}-{n}": (engine, n) for engine, n in SETUPS}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"setups are among {', '.join(known)}; got {text!r}")
    return tuple(known[name] for name in names)


def run(
    seconds: int, concurrency: int, out: Path, setups: tuple[tuple[str, int], ...] = SETUPS
) -> dict[str, Any]:
    from tests.postgres import start_server  # the test suite's server, durable here

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "seconds": seconds,
        "concurrency": concurrency,
        "loadavg_start": loadavg(),
        "setups": {},
    }
    with tempfile.TemporaryDirectory(prefix="hsmbridge-instances-") as tmp:
        work = Path(tmp)
        server, _ = start_server(work / "postgres", durable=True)
        try:
            for engine, n in setups:
                url = None
                if engine == "postgresql":
                    url = server.url(server.create_database())
                env = init_env(work / f"{engine}-{n}", logs, url)
                akid, secret = env.credentials()
                log(f"{engine}, {n} instance(s)")
                started = start_instances(env, n, logs)
                try:
                    targets = [
                        signing.Target("hsmbridge", port, akid, secret) for _, port in started
                    ]
                    bodies = _bodies(targets[0])
                    setup: dict[str, Any] = {}
                    for operation in OPERATIONS:
                        setup[operation] = figures = measure(
                            targets, operation, bodies[operation],
                            concurrency=concurrency, seconds=seconds, work=work,
                        )  # fmt: skip
                        log(f"  {operation:15} {json.dumps(figures)}")
                    results["setups"][f"{engine}-{n}"] = setup
                finally:
                    for proc, _ in started:
                        proc.stop()
        finally:
            server.stop("fast")
    results["loadavg_end"] = loadavg()
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        START,
        "## Several instances",
        "",
        f"`python -m benchmarks.instances`, {results['started']}: wrk, {results['concurrency']} "
        f"connections split evenly over the instances, {results['seconds']} s per operation; "
        "each instance is `hsmbridge serve --workers 1`; PostgreSQL is local and durable (fsync "
        f"on). Load average {results['loadavg_start']} before, {results['loadavg_end']} after.",
        "",
        "| setup | " + " | ".join(f"{op} req/s (p99 ms)" for op in OPERATIONS) + " | non-2xx |",
        "|---|" + "---|" * (len(OPERATIONS) + 1),
    ]
    for name, setup in results["setups"].items():
        engine, n = name.rsplit("-", 1)
        cells, bad = [], 0
        for op in OPERATIONS:
            f = setup[op]
            if "error" in f:
                cells.append("failed")
                continue
            cells.append(f"{f['rps']:,.0f} ({f['p99_ms']})")
            bad += f["non_2xx"]
        label = f"{n} instance{'s' if n != '1' else ''} on {engine}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {bad} |")
    lines += [
        "",
        "What this two-core machine can and cannot show: PostgreSQL, every instance and the load "
        "generator share two cores, so a second or third instance adds processes, not capacity; "
        "the rows measure what one shared database costs per request (no read cache: every "
        "request reads its key and store rows over a socket, where SQLite reads its cache) and "
        "that requests on different instances do not serialise on each other, except CreateKey, "
        "which takes the database-wide write lock. Scaling out needs the instances, the "
        "database and the HSM on machines of their own.",
        END,
    ]
    return "\n".join(lines) + "\n"


def publish(section: str, docs_file: Path) -> None:
    """Replace (or append) the section between the markers in docs/benchmarks.md."""
    text = docs_file.read_text() if docs_file.exists() else ""
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    docs_file.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.instances", description=__doc__)
    parser.add_argument("--seconds", type=int, default=6, help="wrk run per operation")
    parser.add_argument("--concurrency", type=int, default=64, help="connections in all")
    parser.add_argument("--out", type=Path, help="default: bench-results/instances-<timestamp>")
    parser.add_argument(
        "--setups", type=parse_setups, default=SETUPS,
        help="comma-separated, default: every one of " + ",".join(f"{e}-{n}" for e, n in SETUPS),
    )  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    if args.docs and args.setups != SETUPS:
        parser.error("--docs publishes a full run: leave out --setups")
    if not wrk.available():
        raise SystemExit("wrk is not installed: apt-get install wrk (benchmarks/run.sh does)")
    out = args.out or REPO / "bench-results" / time.strftime("instances-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results = run(args.seconds, args.concurrency, out, args.setups)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    section = markdown(results)
    (out / "report.md").write_text(section)
    print(section)
    if args.docs:
        publish(section, REPO / "docs" / "benchmarks.md")
        log("updated the Several instances section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
