"""Run the ASGI app under uvicorn: `serve` for the CLI's foreground process, `serve_workers` for
N worker processes behind one listening socket, `ThreadedServer` for tests and embedding.

Owns: uvicorn configuration (TLS, keep-alive, graceful shutdown, no access log, no proxy headers,
the HTTP parser and event loop), the connection-level defences (a deadline for a request's headers,
a header size cap, a cap on connections per client address, a file-descriptor limit raised to
what the system allows) and the thread/signal plumbing around it. uvicorn's own concurrency limit
is off: it counts open connections, so ~2,000 idle sockets made every request answer 503. The app
limits requests in flight instead (`app.MAX_IN_FLIGHT`); an idle connection costs a socket and is
cut at the header deadline.
Parser and loop: httptools and uvloop when installed (both are dependencies). Under
GenerateDataKey load h11's pure-Python state machine was ~30 % of the server's GIL time;
httptools is C. uvloop's loop replaces asyncio's pure-Python one (loop="auto" picks it).
Must not import: pkcs11, service or backend modules. This is one of the only modules allowed to
import uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors.multiprocess import Multiprocess

from hsmbridge.http.app import KmsApi

log = logging.getLogger(__name__)

TIMEOUT_KEEP_ALIVE_S: Final = 75  # above common load balancer idle timeouts (60 s)
MAX_HEADER_BYTES: Final = 64 * 1024
# Sockets this process may open: idle attackers each hold one until the header deadline.
FD_LIMIT_WANTED: Final = 65536
# A request's headers must arrive this long after its first byte (or after the connection opens).
# uvicorn's keep-alive timer stops at the first byte and nothing restarts it, so without this a
# client sending a header a byte at a time, or nothing at all, holds its socket forever
# (slowloris). The body has its own deadline in KmsApi._read_body.
HEADER_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class Tls:
    """HTTPS: the server's certificate chain and its private key, PEM files."""

    cert_file: Path
    key_file: Path


class _HeaderDeadline(asyncio.Protocol):
    """Header deadline (see HEADER_TIMEOUT_S), mixed into uvicorn's HTTP protocol class.

    Armed when a connection opens and at the first byte of each further request on a kept-alive
    connection; disarmed once the request line and headers are in."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes: int = 0
    _header_tail: bytes = b""
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _between_requests(self) -> bool:
        return self._header_timer is None and (self.cycle is None or self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_bytes = 0
        self._header_tail = b""
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no response: there is no request to answer yet


class OneSendPerResponse:
    """A connection's transport that holds a response's status line and headers until its body
    is written, so each response leaves in one send: uvicorn writes the two separately, one more
    system call per request (~6 % of a worker's time under GenerateDataKey load here).

    uvicorn writes a response's header block in one piece, then its body (none for HEAD); a held
    block goes out with the next write, at the response's completion (`flush()`, called by the
    protocol) or at close, whichever comes first. Nothing else uvicorn writes ends with a blank
    line after an HTTP status line, and `100 Continue` goes out at once (the client waits for
    it before it sends the body)."""

    __slots__ = ("_held", "_inner")

    def __init__(self, inner: asyncio.Transport) -> None:
        self._inner = inner
        self._held = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        elif data[:9] == b"HTTP/1.1 " and data[-4:] == b"\r\n\r\n" and data[9:12] != b"100":
            self._held = bytes(data)
            return
        self._inner.write(data)

    def flush(self) -> None:
        if self._held:
            data, self._held = self._held, b""
            self._inner.write(data)

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def abort(self) -> None:
        self._held = b""
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...
        return getattr(self._inner, name)


# The cyclic garbage collector's first-generation threshold while serving (CPython's default:
# 700 allocations). A request allocates hundreds of objects, so the default ran a collection
# every few requests; most of them free nothing (requests make little cyclic garbage).
GC_GEN0_THRESHOLD: Final = 20_000


def tune_gc_for_serving() -> None:
    """Call once the app is built, before the first request: what start-up made (botocore's
    model, the policy caches) moves to the permanent generation, which collections never scan
    again, and the first generation is collected less often. Measured with wrk, Encrypt at 64
    connections: +9 % requests/s and a lower p99 than the defaults."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _open_per_client(server_state: Any) -> Counter[str]:
    """Open connections per client address, kept beside uvicorn's own connection set."""
    counts: Counter[str] | None = getattr(server_state, "hsmbridge_per_client", None)
    if counts is None:
        counts = Counter()
        server_state.hsmbridge_per_client = counts
    return counts


class _DeadlineHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol plus the header deadline and the per-client connection cap
    (the app's `max_connections_per_client`; 0 turns it off, for a server behind a proxy)."""

    _counted_as: str | None = None
    _sender: OneSendPerResponse | None = None
    server_state: Any
    app: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport; both have the methods.
        self._sender = OneSendPerResponse(cast(asyncio.Transport, transport))
        super().connection_made(self._sender)  # type: ignore[arg-type]
        cap = getattr(self.app, "max_connections_per_client", 0)
        peer = transport.get_extra_info("peername")
        if cap and isinstance(peer, tuple) and peer:
            counts = _open_per_client(self.server_state)
            address = str(peer[0])
            if counts[address] >= cap:
                # Cut before a byte is read: one address cannot hold every socket the process has.
                self.transport.abort()
                return
            counts[address] += 1
            self._counted_as = address
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm_header_timer()  # first byte of a further request on a kept-alive connection
        if self._header_timer is not None and self._headers_too_large(data):
            if not self.transport.is_closing():
                self._disarm_header_timer()
                self.send_400_response("Request headers are too large.")  # closes the connection
            return  # never fed to the parser: llhttp has no size limit of its own
        super().data_received(data)

    def _headers_too_large(self, data: bytes) -> bool:
        """Count the bytes of the request line and headers, up to the blank line that ends them,
        before the parser sees them: counted after parsing, a request arriving in one piece was
        never counted at all. The last 3 bytes are kept so a terminator split across two reads
        is still found."""
        window = self._header_tail + data
        end = window.find(b"\r\n\r\n")
        self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._header_tail))
        self._header_tail = window[-3:]
        return self._header_bytes > MAX_HEADER_BYTES

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()  # httptools calls this once the request line and headers are in
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        if self._sender is not None:
            self._sender.flush()  # a HEAD response has no body write to carry its headers
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._counted_as is not None:
            counts = _open_per_client(self.server_state)
            counts[self._counted_as] -= 1
            if counts[self._counted_as] <= 0:
                del counts[self._counted_as]
            self._counted_as = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # Server shutdown, this connection idle between requests: under TLS, close() sends
        # close_notify and waits (asyncio: up to 30 s) for a client that is not reading, which
        # kept a graceful shutdown waiting on every pooled SDK connection. Nothing is in flight.
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.transport.get_extra_info("sslcontext") is not None:
            self.transport.abort()
            return
        super().shutdown()


class _Server(uvicorn.Server):
    """uvicorn.Server that reports readiness and returns after a signal. Signal handlers: uvicorn
    installs SIGTERM/SIGINT handlers (graceful shutdown) only when run in the main thread."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event | None) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._ready is not None and self.started:
            self._ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the process dies of the
        # signal. That killed `hsmbridge serve` before its cleanup (flush the audit buffer, log
        # out of the HSM, close the DB). Forget the captured signals so `run()` returns and the
        # caller cleans up and exits 0: the shutdown was asked for and went well.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def _config(
    app: KmsApi | str,
    host: str,
    port: int,
    request_timeout_s: float,
    *,
    workers: int = 1,
    tls: Tls | None = None,
) -> uvicorn.Config:
    """`app` is the app itself, or (workers > 1) an import string of a factory each worker calls.
    With `tls` uvicorn serves HTTPS only (each worker loads the files when it starts)."""
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        workers=workers,
        host=host,
        port=port,
        lifespan="on",
        loop="auto",  # uvloop when installed
        http=_DeadlineHttpToolsProtocol,
        access_log=False,  # the audit trail (on_event) records requests, never bodies
        proxy_headers=False,  # source IPs come from the socket; no X-Forwarded-For trust
        server_header=False,
        timeout_keep_alive=TIMEOUT_KEEP_ALIVE_S,
        # In-flight requests get as long as one request may take before shutdown cuts them off.
        timeout_graceful_shutdown=max(1, round(request_timeout_s)),
        limit_concurrency=None,  # see the module docstring: the app limits requests in flight
        log_config=None,  # the process's logging setup (CLI) decides handlers and levels
        ssl_certfile=None if tls is None else str(tls.cert_file),
        ssl_keyfile=None if tls is None else str(tls.key_file),
    )


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (never above the hard limit);
    worker processes inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def serve(
    app: KmsApi,
    host: str,
    port: int,
    *,
    request_timeout_s: float,
    max_request_bytes: int,
    ready: threading.Event | None = None,
    tls: Tls | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (main thread) and then shut down gracefully.

    `max_request_bytes` is enforced by the app while it reads bodies (uvicorn has no body
    limit); it is taken here so callers pass one settings object's worth of limits.
    """
    del max_request_bytes  # enforced in KmsApi._read_body; see the docstring
    raise_fd_limit()
    _Server(_config(app, host, port, request_timeout_s, tls=tls), ready).run()


def serve_workers(
    factory: str,
    host: str,
    port: int,
    *,
    workers: int,
    request_timeout_s: float,
    tls: Tls | None = None,
) -> bool:
    """Serve with `workers` processes sharing one listening socket until SIGTERM/SIGINT.

    uvicorn's supervisor binds the socket, spawns the workers (a fresh interpreter each, so no
    PKCS#11 state crosses a fork), restarts a worker that dies, and on SIGTERM/SIGINT sends each
    worker SIGTERM and waits: each drains its requests and runs lifespan shutdown. `factory` is
    the import string of a zero-argument app factory each worker calls. Returns False when a
    worker could not start (the supervisor then stops: every restart would fail the same way).
    """
    raise_fd_limit()
    config = _config(factory, host, port, request_timeout_s, workers=workers, tls=tls)
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    return not any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)


class ThreadedServer:
    """The app on a free loopback port in a background thread: `.start()`, `.endpoint_url`,
    `.stop()`. No signal handlers are installed (not the main thread)."""

    def __init__(self, app: KmsApi, *, host: str = "127.0.0.1", request_timeout_s: float = 5.0):
        self._app = app
        self._host = host
        self._timeout = request_timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def start(self) -> ThreadedServer:
        # Bind here, not in uvicorn, so the port is known before the thread starts.
        # IPPROTO_TCP explicitly: asyncio disables Nagle (TCP_NODELAY) on accepted connections
        # only when the listening socket says it is TCP; without it every response waited
        # ~40 ms for the delayed ACK.
        raise_fd_limit()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._server = _Server(_config(self._app, self._host, self.port, self._timeout), ready)
        server = self._server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="hsmbridge-http", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("hsmbridge HTTP server did not start within 10 s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: stop accepting, finish in-flight requests, run lifespan shutdown."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        self._server = None

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
