"""Run the whole benchmark once and write results.json, report.md and plots.

    python -m benchmarks.run [--quick] [--keys 10,1000] [--out DIR] [--docs]

Phases (each in its own processes, on loopback only): (1) raw python-pkcs11 limit, (2) the
service in-process, (3) hsmbridge over HTTP with SigV4 at each concurrency, (4) moto_server with
the same load, (5) scale: the same store at growing key counts, with the key-label audit at the
largest. Phases 3 and 4 also run `wrk` (a C client, so the client's CPU does not bound the
server's figure) on GenerateDataKey, Encrypt and Decrypt, when wrk is installed. Every child runs
in its own process group and is killed in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import report, signing, wrk
from benchmarks.common import (
    LOOPBACK,
    PY,
    REPO,
    HsmEnv,
    Proc,
    check_load,
    free_port,
    loadavg,
    log,
    machine,
    make_env,
    run_json,
    spawn,
)
from benchmarks.loadgen import write_pool

OPERATIONS = ("Encrypt", "Decrypt", "GenerateDataKey", "CreateKey")
WRK_OPERATIONS = ("GenerateDataKey", "Encrypt", "Decrypt")
WRK_THREADS = 2  # the machine's 2 cores
READY_TIMEOUT_S = 120.0  # start-up at 20,000 keys loads the whole token; allow for it


@dataclass(frozen=True)
class Plan:
    quick: bool
    seconds: float  # per HTTP phase
    inproc_seconds: float
    concurrency: tuple[int, ...]
    keys: tuple[int, ...]
    pool_size: int
    decrypt_blobs: int
    max_requests: int  # per HTTP phase, whatever the duration
    max_creates: int  # per CreateKey phase (each one is a persistent key)
    profile: bool
    wrk_seconds: int  # per wrk run: wrk takes whole seconds
    wrk_threads: int

    @staticmethod
    def from_args(args: argparse.Namespace) -> Plan:
        quick = bool(args.quick)
        keys: tuple[int, ...] = (10, 500) if quick else (10, 1_000, 10_000, 20_000)
        if args.keys:
            keys = tuple(sorted(int(k) for k in args.keys.split(",")))
        conc = tuple(int(c) for c in args.concurrency.split(","))
        seconds = args.seconds or (1.5 if quick else 8.0)
        return Plan(
            quick=quick,
            seconds=seconds,
            inproc_seconds=args.inproc_seconds or (1.0 if quick else 3.0),
            concurrency=conc,
            keys=keys,
            pool_size=200 if quick else 1000,
            decrypt_blobs=50 if quick else 200,
            max_requests=args.max_requests,
            max_creates=min(args.max_requests, 200 if quick else 2000),
            profile=not args.no_profile,
            wrk_seconds=wrk.duration(seconds),
            wrk_threads=WRK_THREADS,
        )


@dataclass(frozen=True)
class Ctx:
    """What every phase needs: the plan, a scratch dir for request pools, the log dir."""

    plan: Plan
    work: Path
    logs: Path


def inproc(ctx: Ctx, mode: str, config: Path, *extra: str, timeout: float = 1800) -> Any:
    argv = [PY, "-m", "benchmarks.inproc", mode, "--config", str(config), *extra]
    return run_json(argv, ctx.logs / "inproc.log", timeout=timeout)


# --- servers -------------------------------------------------------------------------------------


def wait_http(url: str, proc: Proc, timeout: float) -> float:
    """Seconds until `url` answers any HTTP status (the process must stay alive)."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}; see {proc.log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (loopback URL we built)
                return time.perf_counter() - start
        except urllib.error.HTTPError:
            return time.perf_counter() - start
        except (OSError, urllib.error.URLError):
            time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout} s")


def start_hsmbridge(env: HsmEnv, logs: Path) -> tuple[Proc, float]:
    argv = [PY, "-m", "hsmbridge", "serve", "--config", str(env.config), "--port", str(env.port)]
    start = time.perf_counter()
    proc = spawn("hsmbridge", argv, logs / "hsmbridge-server.log")
    try:
        wait_http(f"http://{LOOPBACK}:{env.port}/health", proc, READY_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return proc, time.perf_counter() - start


def first_request(port: int, raw_request: bytes) -> float:
    """Send one pre-signed request and return perf_counter() when its 200 arrived."""
    with socket.create_connection((LOOPBACK, port), timeout=READY_TIMEOUT_S) as sock:
        sock.sendall(raw_request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"first Encrypt failed: {data[:200]!r}")
    return time.perf_counter()


def start_moto(logs: Path) -> tuple[Proc, int]:
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(PY).parent)) or "moto_server"
    proc = spawn("moto", [moto, "-H", LOOPBACK, "-p", str(port)], logs / "moto-server.log")
    try:
        wait_http(f"http://{LOOPBACK}:{port}/moto-api/", proc, 60)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def kms_client(target: signing.Target) -> Any:
    import boto3

    return boto3.client(
        "kms",
        endpoint_url=f"http://{LOOPBACK}:{target.port}",
        region_name=target.region,
        aws_access_key_id=target.access_key,
        aws_secret_access_key=target.secret_key,
    )


# --- HTTP phases ---------------------------------------------------------------------------------


def load_phase(
    ctx: Ctx,
    target: signing.Target,
    operation: str,
    body: signing.Body,
    concurrency: int,
    *,
    max_requests: int | None = None,
) -> dict[str, Any]:
    plan = ctx.plan
    # Signed right before the phase: the server accepts signatures for 5 minutes.
    requests = signing.pool(target, operation, body, plan.pool_size)
    pool_file = ctx.work / f"{target.name}-{operation}-{concurrency}.pool"
    write_pool(pool_file, requests)
    load = check_load(f"{target.name} {operation} c={concurrency}")
    argv = [
        PY, "-m", "benchmarks.loadgen", "--port", str(target.port), "--pool", str(pool_file),
        "--concurrency", str(concurrency), "--seconds", str(plan.seconds),
        "--max", str(max_requests or plan.max_requests),
    ]  # fmt: skip
    result = run_json(argv, ctx.logs / "loadgen.log", timeout=plan.seconds + 120)
    result["loadavg_before"] = load
    ok = result["ok"] == result["requests"]
    log(
        f"{target.name:9} {operation:15} c={concurrency:<3} {result['rps']:>8} req/s "
        f"p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms client cpu "
        f"{result['client_cpu_share']}" + ("" if ok else f" ERRORS {result['statuses']}")
    )
    return result


def suite_bodies(
    ctx: Ctx, target: signing.Target, store_id: str | None
) -> tuple[str, dict[str, signing.Body]]:
    """A fresh key, the decrypt blobs made with it, and the request body of each operation."""
    client = kms_client(target)
    if store_id is None:
        key_id = client.create_key(Description="bench")["KeyMetadata"]["KeyId"]
    else:
        created = client.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)
        key_id = created["KeyMetadata"]["KeyId"]
    blobs = [
        client.encrypt(KeyId=key_id, Plaintext=f"blob {i:028d}".encode())["CiphertextBlob"]
        for i in range(ctx.plan.decrypt_blobs)
    ]
    bodies: dict[str, signing.Body] = {
        "Encrypt": signing.encrypt_body(key_id),
        "Decrypt": signing.decrypt_body(blobs),
        "GenerateDataKey": signing.data_key_body(key_id),
        "CreateKey": signing.create_key_body(store_id),
    }
    return key_id, bodies


def http_suite(
    ctx: Ctx, target: signing.Target, key_id: str, bodies: dict[str, signing.Body]
) -> dict[str, Any]:
    plan = ctx.plan
    out: dict[str, Any] = {"key_id": key_id}
    for operation in OPERATIONS:  # CreateKey last: it grows the store the others use
        out[operation] = {}
        for conc in plan.concurrency:
            cap = plan.max_creates if operation == "CreateKey" else None
            out[operation][str(conc)] = load_phase(
                ctx, target, operation, bodies[operation], conc, max_requests=cap
            )
    return out


def wrk_phase(
    ctx: Ctx, target: signing.Target, operation: str, body: signing.Body, concurrency: int
) -> dict[str, Any]:
    plan = ctx.plan
    load = check_load(f"wrk {target.name} {operation} c={concurrency}")
    try:
        result = wrk.run(
            target, operation, body, pool_size=plan.pool_size, concurrency=concurrency,
            seconds=plan.wrk_seconds, threads=plan.wrk_threads, work=ctx.work,
            log_path=ctx.logs / "wrk.log",
        )  # fmt: skip
    except RuntimeError as exc:  # one failed wrk run should not cost the rest of the benchmark
        log(f"wrk {target.name} {operation} c={concurrency} FAILED: {exc}")
        return {"error": str(exc), "loadavg_before": load}
    result["loadavg_before"] = load
    errors = ", ".join(f"{k} {v}" for k, v in result["errors"].items())
    log(
        f"wrk {target.name:9} {operation:15} c={concurrency:<3} {result['rps']:>8} req/s "
        f"p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms client cpu "
        f"{result['client_cpu_share']}"
        + (f" NON-2XX {result['non_2xx']}: {result['error_sample']}" if result["non_2xx"] else "")
        + (f" SOCKET ERRORS {errors}" if errors else "")
    )
    return result


def wrk_suite(ctx: Ctx, target: signing.Target, bodies: dict[str, signing.Body]) -> dict[str, Any]:
    """wrk at the plan's largest concurrency and at 1, keyed like http_suite's results."""
    if not wrk.available():
        log(f"wrk {target.name}: skipped, wrk not installed (apt-get install wrk)")
        return {"skipped": "wrk not installed"}
    out: dict[str, Any] = {}
    for operation in WRK_OPERATIONS:
        out[operation] = {
            str(conc): wrk_phase(ctx, target, operation, bodies[operation], conc)
            for conc in sorted({1, max(ctx.plan.concurrency)})
        }
    return out


def hsmbridge_target(env: HsmEnv) -> signing.Target:
    akid, secret = env.credentials()
    return signing.Target("hsmbridge", env.port, akid, secret)


def store_id_of(target: signing.Target) -> str:
    stores = kms_client(target).describe_custom_key_stores()["CustomKeyStores"]
    return str(stores[0]["CustomKeyStoreId"])


def profile_server(
    proc: Proc, seconds: float, out: Path, load: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """py-spy on the server process while `load` runs; returns a top-frames summary.

    `--gil` samples only the thread holding the GIL: a one-process Python server is bound by
    the GIL long before two cores, so what holds it is what bounds throughput."""
    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if spy is None:
        return {"error": "py-spy not installed"}
    raw = out.with_suffix(".folded")
    argv = [
        spy, "record", "--pid", str(proc.pid), "--duration", str(max(1, round(seconds))),
        "--rate", "250", "--format", "raw", "--output", str(raw), "--gil",
        "--subprocesses",  # the server's workers; the supervisor itself is idle under load
    ]  # fmt: skip
    spy_proc = spawn("py-spy", argv, out.with_suffix(".log"))
    try:
        time.sleep(0.5)  # let py-spy attach before the load starts
        phase = load()
        spy_proc.popen.wait(seconds + 30)
    finally:
        spy_proc.stop()
    summary: dict[str, Any] = (
        report.summarize_folded(raw) if raw.exists() else {"error": "no py-spy output"}
    )
    summary["phase"] = phase
    return summary


# --- scale ---------------------------------------------------------------------------------------


def audit_available() -> bool:
    """The key-label audit CLI, once it has landed (`hsmbridge audit --help` exits 0)."""
    probe = subprocess.run(
        [PY, "-m", "hsmbridge", "audit", "--help"],
        capture_output=True, cwd=REPO, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return probe.returncode == 0


def measure_audit(env: HsmEnv, store_id: str, logs: Path) -> dict[str, Any]:
    """Wall time of `hsmbridge audit --keystore ID` (a fresh process, like the raw side).

    The one place to change if the audit's command line changes."""
    if not audit_available():
        return {"available": False}
    argv = [
        PY, "-m", "hsmbridge", "audit", "--config", str(env.config), "--keystore", store_id,
        "--output", "json",
    ]  # fmt: skip
    start = time.perf_counter()
    with (logs / "audit.log").open("ab") as err:
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO, timeout=1800, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    (logs / "audit.json").write_bytes(done.stdout)
    # Exit 1 means findings: the bulk-loaded keys should be clean, so a 1 is worth a look.
    findings: Any = None
    with contextlib.suppress(ValueError, TypeError, KeyError):
        doc = json.loads(done.stdout)
        findings = len(doc["findings"]) if isinstance(doc, dict) else None
    return {
        "available": True,
        "seconds": round(seconds, 3),
        "exit_code": done.returncode,
        "findings": findings,
    }


def scale_point(ctx: Ctx, env: HsmEnv, n: int) -> dict[str, Any]:
    """Fill the store to n keys, then measure in-process, start-up and HTTP Encrypt at n."""
    quick = ctx.plan.quick
    check_load(f"fill to {n} keys")
    fill = inproc(ctx, "fill", env.config, "--target", str(n), timeout=3600)
    log(f"scale: {fill['total']} keys (filled {fill['created']} in {fill['seconds']} s)")
    point: dict[str, Any] = {"keys": n, "fill": fill, "loadavg_before": check_load(f"scale {n}")}
    creates, cold = ("20", "20") if quick else ("50", "50")
    point["inproc"] = inproc(
        ctx, "scale", env.config, "--seconds", str(ctx.plan.inproc_seconds),
        "--max-keys", creates, "--cold", cold,
    )  # fmt: skip
    # The server is started only now: start-up at n keys is one of the measurements, and a
    # running server would have to re-read the token while the fill above wrote it.
    target = hsmbridge_target(env)
    body = signing.encrypt_body(point["inproc"]["hot_key"])
    first = signing.sign(target, "Encrypt", body(0))
    proc, startup = start_hsmbridge(env, ctx.logs)
    spawned = time.perf_counter() - startup
    try:
        point["startup_s"] = round(startup, 3)
        # /health may answer before the token is loaded and logged in (lazy login), so the
        # first Encrypt after it is part of start-up as a client sees it.
        point["first_encrypt_s"] = round(first_request(env.port, first) - spawned, 3)
        point["store_id"] = store_id_of(target)
        point["http_encrypt_c1"] = load_phase(ctx, target, "Encrypt", body, 1)
    finally:
        proc.stop()
    inp = point["inproc"]
    log(
        f"scale {n:>6} keys: start-up {point['startup_s']} s, in-process Encrypt p50 "
        f"{inp['Encrypt_hot']['p50_ms']} ms, first use p50 {inp['Encrypt_first_use']['p50_ms']} "
        f"ms, CreateKey {inp['CreateKey']['ops_per_s']}/s"
    )
    return point


def scale_suite(ctx: Ctx, env: HsmEnv) -> dict[str, Any]:
    """One store grown through every size (the 20,000 keys are created once per run)."""
    points = [scale_point(ctx, env, n) for n in ctx.plan.keys]
    out: dict[str, Any] = {"points": points}
    check_load("enumeration and audit")
    start = time.perf_counter()
    raw = inproc(ctx, "enumerate", env.config)
    raw["process_seconds"] = round(time.perf_counter() - start, 3)
    out["raw_enumeration"] = raw
    out["audit"] = measure_audit(env, points[-1]["store_id"], ctx.logs)
    log(f"raw enumeration of {raw['objects']} keys: {raw['process_seconds']} s; {out['audit']}")
    return out


# --- main ----------------------------------------------------------------------------------------


def http_phases(ctx: Ctx, env: HsmEnv, out_dir: Path, results: dict[str, Any]) -> None:
    proc, startup = start_hsmbridge(env, ctx.logs)
    try:
        target = hsmbridge_target(env)
        results["hsmbridge_startup_s"] = round(startup, 3)
        key_id, bodies = suite_bodies(ctx, target, store_id_of(target))
        results["http_hsmbridge"] = http_suite(ctx, target, key_id, bodies)
        results["wrk_hsmbridge"] = wrk_suite(ctx, target, bodies)
        if ctx.plan.profile:
            body = bodies["GenerateDataKey"]
            conc = max(ctx.plan.concurrency)
            results["profile_http_gdk"] = profile_server(
                proc,
                ctx.plan.seconds,
                out_dir / "profiles" / "server_gdk",
                lambda: load_phase(ctx, target, "GenerateDataKey", body, conc),
            )
    finally:
        proc.stop()
    log("4/5 moto_server")
    mproc, mport = start_moto(ctx.logs)
    try:
        # moto does not check signatures; any credentials sign a valid-looking request.
        mtarget = signing.Target("moto", mport, "testing", "testing")
        key_id, bodies = suite_bodies(ctx, mtarget, None)
        results["http_moto"] = http_suite(ctx, mtarget, key_id, bodies)
        results["wrk_moto"] = wrk_suite(ctx, mtarget, bodies)
    finally:
        mproc.stop()


def run(plan: Plan, out_dir: Path) -> dict[str, Any]:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "plan": plan.__dict__,
        "machine": machine(),
        "loadavg_start": check_load("the run"),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hsmbridge-bench-") as tmp:
        ctx = Ctx(plan, Path(tmp), logs)
        log("creating environments (hsmbridge init x4)")
        envs = {
            n: make_env(ctx.work / n, logs / "init.log") for n in ("raw", "svc", "http", "scale")
        }
        secs, keys = str(plan.inproc_seconds), "200" if plan.quick else "1000"

        log("1/5 raw python-pkcs11")
        results["loadavg_raw"] = check_load("raw")
        raw_cfg = envs["raw"].config
        results["raw"] = inproc(ctx, "raw", raw_cfg, "--seconds", secs, "--max-keys", keys)

        log("2/5 service in-process")
        results["loadavg_service"] = check_load("service")
        extra = ["--profile-dir", str(out_dir / "profiles")] if plan.profile else []
        svc_cfg = envs["svc"].config
        results["service"] = inproc(
            ctx, "service", svc_cfg, "--seconds", secs, "--max-keys", keys, *extra
        )

        log("3/5 hsmbridge over HTTP")
        http_phases(ctx, envs["http"], out_dir, results)

        log(f"5/5 scale: {plan.keys} keys")
        results["scale"] = scale_suite(ctx, envs["scale"])
    results["loadavg_end"] = loadavg()
    results["duration_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = report.targets(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short phases (<3 min)")
    parser.add_argument("--keys", help="comma-separated key counts for the scale phase")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--seconds", type=float, help="duration of each HTTP phase")
    parser.add_argument("--inproc-seconds", type=float, help="duration of each in-process loop")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="cap per HTTP phase")
    parser.add_argument("--out", type=Path, help="default: bench-results/<timestamp>")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy/pyinstrument")
    parser.add_argument(
        "--docs", action="store_true", help="copy the report to docs/benchmarks.md (full runs)"
    )
    args = parser.parse_args()
    plan = Plan.from_args(args)
    out_dir = args.out or REPO / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = run(plan, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = report.write(results, out_dir)
    log(f"done in {results['duration_s']} s: {out_dir / 'report.md'}")
    print(md.split("## Targets", 1)[-1].split("\n## ", 1)[0] if "## Targets" in md else "")
    if args.docs:
        report.publish(results, out_dir, REPO / "docs")
        log("copied the report to docs/benchmarks.md")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
