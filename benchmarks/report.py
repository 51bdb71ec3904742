"""results.json -> targets, ratios, PNG plots (matplotlib, Agg) and a markdown report.

Targets are the issue's; they are reported as met/missed with the measured value and never
asserted anywhere. Hand-written analysis of what bounds a missed target lives in
benchmarks/ANALYSIS.md and is appended to the report.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OPS = ("Encrypt", "Decrypt", "GenerateDataKey", "CreateKey")
WRK_OPS = ("GenerateDataKey", "Encrypt", "Decrypt")  # what benchmarks.run sends with wrk
WRK_SIDES = ("wrk_hsmbridge", "wrk_moto")
# docs/benchmarks.md's "Several instances" section, written by `benchmarks.instances`.
INSTANCES_START = "<!-- instances:start -->"
INSTANCES_END = "<!-- instances:end -->"


def _rate(section: dict[str, Any], name: str) -> float:
    return float(section.get(name, {}).get("ops_per_s", 0.0))


def raw_equivalents(raw: dict[str, Any]) -> dict[str, float]:
    """The raw PKCS#11 work behind each KMS operation, as a rate (GenerateDataKey = 32 random
    bytes + one 32-byte GCM encryption, the two latencies added)."""
    enc, rnd = _rate(raw, "gcm_encrypt_32"), _rate(raw, "random_32")
    gdk = 1.0 / (1.0 / enc + 1.0 / rnd) if enc and rnd else 0.0
    return {
        "CreateKey": _rate(raw, "keygen_persistent"),
        "Encrypt": enc,
        "Decrypt": _rate(raw, "gcm_decrypt_32"),
        "GenerateDataKey": gdk,
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    raw = raw_equivalents(results.get("raw", {}))
    service = results.get("service", {})
    out: dict[str, Any] = {"service_over_raw": {}, "hsmbridge_over_moto": {}}
    for op in OPS:
        out["service_over_raw"][op] = _ratio(_rate(service, op), raw[op])
        per_c: dict[str, float | None] = {}
        hb, moto = results.get("http_hsmbridge", {}), results.get("http_moto", {})
        for conc, res in hb.get(op, {}).items():
            peer = moto.get(op, {}).get(conc, {}).get("rps", 0.0)
            per_c[conc] = _ratio(float(res.get("rps", 0.0)), float(peer))
        out["hsmbridge_over_moto"][op] = per_c
    return out


def _target(
    name: str, measured: float | None, goal: float, unit: str, *, le: bool = False
) -> dict[str, Any]:
    if measured is None:
        status = "not measured"
    else:
        status = "met" if (measured <= goal if le else measured >= goal) else "missed"
    return {"target": name, "measured": measured, "goal": goal, "unit": unit, "status": status}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    raw = raw_equivalents(results.get("raw", {}))
    service = results.get("service", {})
    out = [
        _target("CreateKey through the service >= 0.85x raw persistent keygen",
                _ratio(_rate(service, "CreateKey"), raw["CreateKey"]), 0.85, "x"),
        _target("In-process Encrypt >= 0.5x raw AES-GCM (32 B)",
                _ratio(_rate(service, "Encrypt"), raw["Encrypt"]), 0.5, "x"),
    ]  # fmt: skip
    hb = results.get("http_hsmbridge", {}).get("GenerateDataKey", {})
    moto = results.get("http_moto", {}).get("GenerateDataKey", {})
    top = max(hb, key=int) if hb else None
    if top is not None:
        gdk = hb[top]
        peer = moto.get(top, {}).get("rps", 0.0)
        raw_gcm = _rate(results.get("raw", {}), "gcm_encrypt_32")
        out += [
            _target(f"HTTP GenerateDataKey c={top} >= 15x moto_server",
                    _ratio(gdk["rps"], peer), 15.0, "x"),
            _target(f"HTTP GenerateDataKey c={top} p99 <= 20 ms",
                    gdk["p99_ms"], 20.0, "ms", le=True),
            _target(f"HTTP GenerateDataKey c={top} >= 1/6 raw AES-GCM rate",
                    _ratio(gdk["rps"], raw_gcm / 6.0), 1.0, "x of raw/6 "
                    f"({round(raw_gcm / 6.0)} req/s)"),
        ]  # fmt: skip
    scale = results.get("scale", {})
    points = scale.get("points", [])
    if len(points) >= 2:
        lo, hi = points[0], points[-1]
        out.append(
            _target(
                f"HTTP Encrypt p50 (c=1) at {hi['keys']} keys <= 1.1x at {lo['keys']} keys",
                _ratio(hi["http_encrypt_c1"]["p50_ms"], lo["http_encrypt_c1"]["p50_ms"]),
                1.1, "x", le=True,
            )
        )  # fmt: skip
        out.append(
            _target(
                f"(informational) first Encrypt of a key at {hi['keys']} keys <= 1.1x at "
                f"{lo['keys']} keys",
                _ratio(hi["inproc"]["Encrypt_first_use"]["p50_ms"],
                       lo["inproc"]["Encrypt_first_use"]["p50_ms"]),
                1.1, "x", le=True,
            )
        )  # fmt: skip
    audit = scale.get("audit", {})
    raw_enum = scale.get("raw_enumeration", {})
    n = points[-1]["keys"] if points else 0
    measured = (
        _ratio(audit["seconds"], raw_enum["process_seconds"])
        if audit.get("available") and raw_enum.get("process_seconds")
        else None
    )
    row = _target(f"Audit of {n} keys <= 2x raw enumeration", measured, 2.0, "x", le=True)
    if not audit.get("available", False):
        row["status"] = "pending (hsmbridge audit has not landed)"
    out.append(row)
    return out + wrk_targets(results)


def _wrk_phase(results: dict[str, Any], side: str, op: str, conc: str) -> dict[str, Any]:
    """One wrk run's figures, or {} when it was skipped, failed or is absent (older results)."""
    res = (results.get(side) or {}).get(op, {})
    phase = res.get(conc, {}) if isinstance(res, dict) else {}
    return phase if "rps" in phase else {}


def wrk_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's HTTP targets measured with wrk (a C client), so the client's CPU does not
    bound the server's figure: at the plan's top concurrency and at c=1."""
    raw = results.get("raw", {})
    top = str(max(results.get("plan", {}).get("concurrency") or [64]))
    skipped = (results.get("wrk_hsmbridge") or {}).get("skipped")
    out: list[dict[str, Any]] = []
    for op in WRK_OPS:
        hb = _wrk_phase(results, "wrk_hsmbridge", op, top)
        moto = _wrk_phase(results, "wrk_moto", op, top)
        single = _wrk_phase(results, "wrk_hsmbridge", op, "1")
        # The AES-GCM operation behind the request, as the existing GenerateDataKey target.
        kind = "decrypt" if op == "Decrypt" else "encrypt"
        raw_gcm = _rate(raw, f"gcm_{kind}_32")
        rps = hb.get("rps")
        out += [
            _target(f"HTTP (wrk) {op} c={top} >= 1/5 raw AES-GCM {kind} rate",
                    _ratio(rps, raw_gcm / 5.0) if rps is not None else None, 1.0,
                    f"x of raw/5 ({round(raw_gcm / 5.0)} req/s)"),
            _target(f"HTTP (wrk) {op} c={top} >= 15x moto_server",
                    _ratio(rps, moto.get("rps", 0.0)) if rps is not None else None, 15.0, "x"),
            _target(f"HTTP (wrk) {op} c={top} p99 <= 20 ms", hb.get("p99_ms"), 20.0, "ms",
                    le=True),
            _target(f"HTTP (wrk) {op} c={top} non-2xx responses = 0", hb.get("non_2xx"), 0,
                    "responses", le=True),
            _target(f"HTTP (wrk) {op} c=1 p50 <= 0.3 ms", single.get("p50_ms"), 0.3, "ms",
                    le=True),
        ]  # fmt: skip
    if skipped:
        for row in out:
            if row["measured"] is None:
                row["status"] = f"not measured ({skipped})"
    return out


# --- py-spy ------------------------------------------------------------------------------------

CATEGORIES = (
    ("PKCS#11 (python-pkcs11 + SoftHSM)", ("pkcs11/", "_pkcs11")),
    ("metadata (SQLite)", ("hsmbridge/metadata/",)),
    ("retries (tenacity)", ("tenacity/",)),
    ("backend sessions/locks", ("hsmbridge/backend/",)),
    ("service layer", ("hsmbridge/service/",)),
    ("SigV4 verification", ("hsmbridge/http/sigv4.py",)),
    ("request validation", ("hsmbridge/protocol/validation.py",)),
    ("audit sink", ("hsmbridge/audit/",)),
    ("HTTP (uvicorn/h11)", ("uvicorn/", "h11/")),
    ("HTTP app (routing, JSON, request ids)", ("hsmbridge/http/", "hsmbridge/protocol/")),
    (
        "event loop / thread hand-off",
        ("asyncio/", "concurrent/futures", "threading.py", "selectors.py", "queue.py"),
    ),
)


def _interesting(frame: str) -> bool:
    """hsmbridge frames below the CLI's entry points (those are on every stack)."""
    return "hsmbridge/" in frame and not any(
        skip in frame for skip in ("hsmbridge/cli/", "hsmbridge/__main__", "serve (")
    )


def summarize_folded(path: Path, top: int = 15) -> dict[str, Any]:
    """Collapsed py-spy stacks -> total samples, share per category, hottest frames."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")[1:]]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
        # A sample belongs to the innermost category on its stack.
        for frame in reversed(frames):
            hit = next((c for c, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                cats[hit] += count
                break
        else:
            cats["other"] += count

    def pct(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "categories_pct": pct(cats) if total else [],
        "self_pct": pct(own) if total else [],
        "inclusive_hsmbridge_pct": [
            row for row in pct(Counter({k: v for k, v in incl.items() if _interesting(k)}))
        ]
        if total
        else [],
    }


# --- plots -------------------------------------------------------------------------------------


def plot(results: dict[str, Any], out_dir: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # the test extra lacks it; the smoke test still gets JSON and markdown
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return _plot_throughput(plt, results, out_dir) + _plot_scale(plt, results, out_dir)


def _plot_throughput(plt: Any, results: dict[str, Any], out_dir: Path) -> list[str]:
    files: list[str] = []
    hb, moto = results.get("http_hsmbridge", {}), results.get("http_moto", {})
    if hb:
        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        for ax, op in zip(axes, OPS, strict=True):
            for name, data in (("hsmbridge", hb), ("moto_server", moto)):
                series = data.get(op, {})
                xs = sorted(int(c) for c in series)
                ax.plot(xs, [series[str(c)]["rps"] for c in xs], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(op)
            ax.set_xlabel("concurrency")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("requests/s (log)")
        axes[0].legend()
        fig.suptitle("HTTP throughput vs concurrency (SigV4, loopback)")
        fig.tight_layout()
        fig.savefig(out_dir / "throughput_vs_concurrency.png", dpi=90)
        plt.close(fig)
        files.append("throughput_vs_concurrency.png")
    return files


def _plot_scale(plt: Any, results: dict[str, Any], out_dir: Path) -> list[str]:
    files: list[str] = []
    points = results.get("scale", {}).get("points", [])
    if points:
        ns = [p["keys"] for p in points]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
        ax1.plot(ns, [p["http_encrypt_c1"]["p50_ms"] for p in points], marker="o",
                 label="HTTP Encrypt p50 (c=1, hot key)")  # fmt: skip
        ax1.plot(ns, [p["http_encrypt_c1"]["p99_ms"] for p in points], marker="o",
                 label="HTTP Encrypt p99 (c=1, hot key)")  # fmt: skip
        ax1.plot(ns, [p["inproc"]["Encrypt_hot"]["p50_ms"] for p in points], marker="s",
                 label="in-process Encrypt p50 (hot key)")  # fmt: skip
        ax1.plot(ns, [p["inproc"]["Encrypt_first_use"]["p50_ms"] for p in points], marker="^",
                 label="in-process first Encrypt of a key p50")  # fmt: skip
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("keys in the store")
        ax1.set_ylabel("ms (log)")
        ax1.set_title("Encrypt latency vs number of keys")
        ax1.legend(fontsize=8)
        ax1.grid(True, which="both", alpha=0.3)
        ax2.plot(ns, [p["inproc"]["CreateKey"]["ops_per_s"] for p in points], marker="o",
                 label="CreateKey (service, in-process)")  # fmt: skip
        ax2.plot(ns, [p.get("first_encrypt_s", p["startup_s"]) for p in points], marker="s",
                 label="server start-up to first Encrypt (s)")  # fmt: skip
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("keys in the store")
        ax2.set_title("CreateKey keys/s and start-up seconds vs number of keys")
        ax2.legend(fontsize=8)
        ax2.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "latency_vs_keys.png", dpi=90)
        plt.close(fig)
        files.append("latency_vs_keys.png")
    return files


# --- markdown ----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def _busy(results: dict[str, Any]) -> float:
    """The highest 1-minute load seen before any phase."""
    loads = [results.get("loadavg_start", [0])[0]]
    for key in ("loadavg_raw", "loadavg_service"):
        loads.append(results.get(key, [0])[0])
    for side in ("http_hsmbridge", "http_moto", *WRK_SIDES):
        for op in OPS:
            per_c = (results.get(side) or {}).get(op, {})
            for res in per_c.values() if isinstance(per_c, dict) else ():
                loads.append(res.get("loadavg_before", [0])[0])
    for p in results.get("scale", {}).get("points", []):
        loads.append(p.get("loadavg_before", [0])[0])
    return float(max(loads))


def preliminary_reasons(results: dict[str, Any]) -> list[str]:
    plan = results.get("plan", {})
    reasons = []
    if plan.get("quick"):
        reasons.append("--quick mode")
    if max(plan.get("keys", [0])) < 20_000:
        reasons.append(f"reduced key counts {plan.get('keys')}")
    # The load before a phase includes the decaying tail of the benchmark's own previous phase
    # (two server workers and the load generator on two cores); other work shows as load
    # before the run began.
    start_load = float(results.get("loadavg_start", [0.0])[0])
    if start_load > 1.0:
        reasons.append(f"machine busy (1-min load {start_load} when the run began)")
    if not results.get("scale", {}).get("audit", {}).get("available"):
        reasons.append("audit not yet available")
    return reasons


def _md_head(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    rat = ratios(results)
    raw = results.get("raw", {})
    lines = ["# hsmbridge benchmarks", ""]
    reasons = preliminary_reasons(results)
    if reasons:
        lines += [f"**PRELIMINARY** — {'; '.join(reasons)}.", ""]
    lines += [
        f"Run {results['started']} (commit {m['git_commit']}), {results['duration_s']} s. "
        f"Load average at start {results['loadavg_start']}, at end {results['loadavg_end']}; "
        "the load before each phase includes the benchmark's own previous phase; "
        f"highest 1-min load before a phase: {_busy(results)}.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores; memory {m['memory_gib']} GiB; "
        f"kernel {m['kernel']}",
        f"- Python {m['python']}; SoftHSM {m['softhsm']}; "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        "- Client and servers share the machine (loopback only); the client's CPU share is listed.",
        "",
        "## Targets",
        "",
        "| target | measured | goal | status |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {_fmt(t['measured'])} {t['unit']} | {t['goal']} | "
            f"**{t['status']}** |"
        )
    lines += ["", "## 1. Raw python-pkcs11 limit (one thread, cached handle)", "",
              "| operation | ops/s | p50 ms | p99 ms |", "|---|---|---|---|"]  # fmt: skip
    for name, res in raw.items():
        lines.append(f"| {name} | {_fmt(res['ops_per_s'])} | {res['p50_ms']} | {res['p99_ms']} |")
    eq = raw_equivalents(raw)
    lines += ["", "## 2. Service layer in-process (vs the raw work behind each operation)", "",
              "| operation | ops/s | p50 ms | p99 ms | raw equivalent ops/s | service/raw |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for op in OPS:
        res = results.get("service", {}).get(op)
        if res:
            lines.append(
                f"| {op} | {_fmt(res['ops_per_s'])} | {res['p50_ms']} | {res['p99_ms']} | "
                f"{_fmt(eq[op])} | {_fmt(rat['service_over_raw'][op])} |"
            )
    return lines


def _md_http(results: dict[str, Any]) -> list[str]:
    rat = ratios(results)
    lines = ["", "## 3-4. HTTP with SigV4: hsmbridge vs moto_server", "",
              "| operation | c | hsmbridge req/s | p50 ms | p99 ms | client CPU | moto req/s | "
              "moto p50 ms | moto p99 ms | hsmbridge/moto |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    hb, moto = results.get("http_hsmbridge", {}), results.get("http_moto", {})
    for op in OPS:
        for conc, res in hb.get(op, {}).items():
            peer = moto.get(op, {}).get(conc, {})
            errs = (
                "" if res["ok"] == res["requests"] else f" ({res['requests'] - res['ok']} errors)"
            )
            lines.append(
                f"| {op} | {conc} | {_fmt(res['rps'])}{errs} | {res['p50_ms']} | {res['p99_ms']} "
                f"| {res['client_cpu_share']} | {_fmt(peer.get('rps'))} | {peer.get('p50_ms')} | "
                f"{peer.get('p99_ms')} | {_fmt(rat['hsmbridge_over_moto'][op].get(conc))} |"
            )
    lines += [
        "",
        "Client CPU: the load generator's CPU seconds / wall seconds (1.0 = one core).",
        f"hsmbridge server start-up (fresh store): {results.get('hsmbridge_startup_s')} s.",
    ]
    return lines


def _md_wrk(results: dict[str, Any]) -> list[str]:
    lines = ["", "## 3-4 (wrk). HTTP, wrk (C client): hsmbridge vs moto_server", ""]
    hb_all, moto_all = results.get("wrk_hsmbridge"), results.get("wrk_moto")
    if not hb_all and not moto_all:
        return [*lines, "Not run (results from before the wrk phase)."]
    skipped = (hb_all or {}).get("skipped")
    if skipped:
        return [*lines, f"Skipped: {skipped} (`apt-get install wrk`)."]
    lines += [
        "| operation | c | hsmbridge req/s | p50 ms | p99 ms | non-2xx | wrk CPU | "
        "hsmbridge req/s, Python loadgen | moto req/s | moto p50 ms | moto p99 ms | "
        "moto non-2xx | hsmbridge/moto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    loadgen = results.get("http_hsmbridge", {})
    concs = sorted({c for op in WRK_OPS for c in (hb_all or {}).get(op, {})}, key=int)

    def failed(res: dict[str, Any]) -> str:
        socket_errors = sum(res.get("errors", {}).values())
        return f"{res['non_2xx']}" + (f" (+{socket_errors} socket errors)" if socket_errors else "")

    for op in WRK_OPS:
        for conc in concs:
            hb = _wrk_phase(results, "wrk_hsmbridge", op, conc)
            moto = _wrk_phase(results, "wrk_moto", op, conc)
            py = loadgen.get(op, {}).get(conc, {})
            hb_cells = (
                f"{_fmt(hb['rps'])} | {hb['p50_ms']} | {hb['p99_ms']} | {failed(hb)} | "
                f"{hb['client_cpu_share']}"
                if hb
                else "error | - | - | - | -"
            )
            moto_cells = (
                f"{_fmt(moto['rps'])} | {moto['p50_ms']} | {moto['p99_ms']} | {failed(moto)}"
                if moto
                else "error | - | - | -"
            )
            ratio = _ratio(hb["rps"], moto["rps"]) if hb and moto else None
            lines.append(
                f"| {op} | {conc} | {hb_cells} | {_fmt(py.get('rps'))} | {moto_cells} | "
                f"{_fmt(ratio)} |"
            )
    lines += [
        "",
        "The same pre-signed requests as the Python load generator, replayed by wrk "
        f"({results.get('plan', {}).get('wrk_threads', 2)} threads, "
        f"{results.get('plan', {}).get('wrk_seconds', '?')} s per run, no warm-up). "
        "req/s counts responses with a status below 400; non-2xx counts statuses above 399. "
        "wrk CPU: wrk's CPU seconds / wall seconds (1.0 = one core).",
    ]
    return lines


def _md_scale(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    scale = results.get("scale", {})
    if scale.get("points"):
        lines += ["", "## 5. Scale", "",
                  "| keys | fill s (ms/key) | start-up s (health / first Encrypt) | "
                  "HTTP Encrypt c=1 p50 / p99 ms | "
                  "in-process Encrypt p50 ms | first Encrypt of a key p50 ms | CreateKey/s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for p in scale["points"]:
            inp = p["inproc"]
            lines.append(
                f"| {p['keys']} | {p['fill']['seconds']} ({p['fill']['ms_per_key']}) | "
                f"{p['startup_s']} / {_fmt(p.get('first_encrypt_s'))} | "
                f"{p['http_encrypt_c1']['p50_ms']} / "
                f"{p['http_encrypt_c1']['p99_ms']} | {inp['Encrypt_hot']['p50_ms']} | "
                f"{inp['Encrypt_first_use']['p50_ms']} | {_fmt(inp['CreateKey']['ops_per_s'])} |"
            )
        enum, audit = scale.get("raw_enumeration", {}), scale.get("audit", {})
        lines += [
            "",
            f"Raw enumeration of {enum.get('objects')} secret keys (fresh process: load+login "
            f"{enum.get('load_login_s')} s, find {enum.get('find_s')} s, label+id reads "
            f"{enum.get('attributes_s')} s): {enum.get('process_seconds')} s wall.",
            f"Audit: {audit}.",
        ]
    return lines


def _md_profile(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    prof = results.get("profile_http_gdk")
    if prof and prof.get("samples"):
        lines += [
            "",
            "## Profile: hsmbridge server under GenerateDataKey at top concurrency",
            "",
            f"py-spy --gil, {prof['samples']} samples of the server process (the GIL holder only:"
            " what the one Python process spends its GIL on). Samples by innermost category:",
            "",
        ]
        lines += [f"- {name}: {p} %" for name, p in prof["categories_pct"]]
        lines += ["", "Hottest hsmbridge frames (inclusive %):", ""]
        lines += [f"- {name}: {p} %" for name, p in prof["inclusive_hsmbridge_pct"][:10]]
        lines += ["", "Hottest frames (self %):", ""]
        lines += [f"- {name}: {p} %" for name, p in prof["self_pct"][:10]]
    return lines


def markdown(results: dict[str, Any], images: list[str], image_dir: str = "") -> str:
    lines = _md_head(results) + _md_http(results) + _md_wrk(results) + _md_scale(results)
    for img in images:
        lines += ["", f"![{img}]({image_dir}{img})"]
    lines += _md_profile(results)
    analysis = HERE / "ANALYSIS.md"
    if analysis.exists():
        lines += ["", analysis.read_text().strip()]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> str:
    images = plot(results, out_dir)
    md = markdown(results, images)
    (out_dir / "report.md").write_text(md)
    return md


def publish(results: dict[str, Any], out_dir: Path, docs: Path) -> None:
    """docs/benchmarks.md plus its PNGs in docs/benchmarks/."""
    img_dir = docs / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    images = [p.name for p in sorted(out_dir.glob("*.png"))]
    for name in images:
        shutil.copy2(out_dir / name, img_dir / name)
    target = docs / "benchmarks.md"
    text = markdown(results, images, "benchmarks/")
    # The "Several instances" section comes from `benchmarks.instances`, run on its own: keep it.
    previous = target.read_text() if target.exists() else ""
    if INSTANCES_START in previous and INSTANCES_END in previous:
        inner = previous.split(INSTANCES_START, 1)[1].split(INSTANCES_END, 1)[0]
        kept = INSTANCES_START + inner + INSTANCES_END
        text = text.rstrip("\n") + "\n\n" + kept + "\n"
    target.write_text(text)
