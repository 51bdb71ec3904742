"""A lean HTTP/1.1 load generator over raw asyncio streams, run as its own process.

    python -m benchmarks.loadgen --port P --pool FILE --concurrency C --seconds S [--max N]

FILE holds complete, pre-signed HTTP requests (each a 4-byte big-endian length and the bytes),
written by `benchmarks.signing`; connections cycle through them with keep-alive. Nothing is
signed, parsed as JSON or allocated per request beyond the response bytes, so the client stays
far cheaper than the server it measures; its CPU share (getrusage of this process over wall
time) is reported so a reader can check. Requests that start during the warm-up are not
recorded. Connections the server closes (HTTP/1.0 servers such as moto's werkzeug) are reopened.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import time
from pathlib import Path
from typing import Any

from benchmarks.common import LOOPBACK, percentile

CONNECT_TIMEOUT_S = 5.0
RESPONSE_TIMEOUT_S = 30.0


def read_pool(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def write_pool(path: Path, requests: list[bytes]) -> None:
    with path.open("wb") as fh:
        for req in requests:
            fh.write(struct.pack(">I", len(req)))
            fh.write(req)


class Run:
    def __init__(self, pool: list[bytes], seconds: float, warmup: float, max_requests: int):
        self.pool = pool
        self.next = 0
        self.max = max_requests
        self.issued = 0
        self.seconds = seconds
        # Warm-up ends after `warmup` seconds or a tenth of the request cap, whichever first,
        # so a small capped run still records requests.
        self.warm_left = max(1, max_requests // 10)
        now = time.perf_counter()
        self.record_from = now + warmup
        self.deadline = self.record_from + seconds
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.reconnects = 0
        self.first_recorded: float | None = None
        self.last_done = now
        self.sample_body: bytes = b""

    def take(self) -> bytes | None:
        now = time.perf_counter()
        if now < self.record_from:
            self.warm_left -= 1
            if self.warm_left < 0:  # warm-up cap reached: measure from now on
                self.record_from = now
                self.deadline = now + self.seconds
        # A phase measures at least one request: on a loaded machine a warm-up request can
        # outlast the whole measuring window (a 0.2 s phase against a moto CreateKey that took
        # over a second), which would otherwise leave the phase with nothing recorded.
        if self.issued >= self.max or (now >= self.deadline and self.issued > 0):
            return None
        if now >= self.record_from:
            self.issued += 1
        req = self.pool[self.next]
        self.next = (self.next + 1) % len(self.pool)
        return req


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, _, rest = head.partition(b"\r\n")
    parts = first.split(b" ", 2)
    status = int(parts[1])
    length = -1
    close = parts[0] == b"HTTP/1.0"
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value)
        elif lname == b"connection":
            token = value.strip().lower()
            close = token == b"close" or (close and token != b"keep-alive")
    if length >= 0:
        body = await reader.readexactly(length)
    else:  # no length: the body runs to the end of the connection
        body = await reader.read()
        close = True
    return status, body, close


async def _connection(run: Run, port: int) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while True:
            req = run.take()
            if req is None:
                return
            if conn is None:
                conn = await asyncio.wait_for(
                    asyncio.open_connection(LOOPBACK, port), CONNECT_TIMEOUT_S
                )
            reader, writer = conn
            t0 = time.perf_counter()
            try:
                writer.write(req)
                status, body, close = await asyncio.wait_for(
                    _read_response(reader), RESPONSE_TIMEOUT_S
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                run.errors[type(exc).__name__] = run.errors.get(type(exc).__name__, 0) + 1
                writer.close()
                conn = None
                run.reconnects += 1
                continue
            t1 = time.perf_counter()
            run.last_done = t1
            if t0 >= run.record_from:
                if run.first_recorded is None:
                    run.first_recorded = t0
                run.latencies.append(t1 - t0)
                run.statuses[status] = run.statuses.get(status, 0) + 1
                if status >= 300 and not run.sample_body:
                    run.sample_body = body[:300]
            if close:
                writer.close()
                conn = None
                run.reconnects += 1
    finally:
        if conn is not None:
            conn[1].close()


async def _main(args: argparse.Namespace, pool: list[bytes]) -> dict[str, Any]:
    run = Run(pool, args.seconds, args.warmup, args.max)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    await asyncio.gather(*(_connection(run, args.port) for _ in range(args.concurrency)))
    wall1 = time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    lat = sorted(run.latencies)
    start = run.first_recorded or wall1
    window = max(1e-9, run.last_done - start)
    ok = sum(n for s, n in run.statuses.items() if 200 <= s < 300)
    return {
        "concurrency": args.concurrency,
        "requests": len(lat),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "errors": run.errors,
        "reconnects": run.reconnects,
        "seconds": round(window, 4),
        "rps": round(ok / window, 1),
        "p50_ms": round(percentile(lat, 50) * 1000, 3),
        "p90_ms": round(percentile(lat, 90) * 1000, 3),
        "p99_ms": round(percentile(lat, 99) * 1000, 3),
        "max_ms": round(lat[-1] * 1000, 3) if lat else 0.0,
        # Client CPU over the whole run (warm-up included) / wall: 1.0 = one core saturated.
        "client_cpu_share": round(cpu / max(1e-9, wall1 - wall0), 3),
        "error_sample": run.sample_body.decode("utf-8", "replace"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--max", type=int, default=1_000_000, help="cap on measured requests")
    args = parser.parse_args()
    pool = read_pool(args.pool)
    try:
        import uvloop  # a cheaper event loop keeps the client's CPU share down

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_main(args, pool))), flush=True)


if __name__ == "__main__":
    main()
