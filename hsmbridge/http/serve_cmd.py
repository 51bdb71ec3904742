"""`hsmbridge serve --config PATH`: run the KMS HTTP API until SIGTERM/SIGINT.

Owns: starting the server from the configuration and printing how to reach it: the endpoint, a
credential pair from the credentials file, and an `aws kms` command that works when pasted.
HTTPS with `--tls-cert`/`--tls-key` (or `[service] tls_cert`/`tls_key`); plain HTTP only on a
loopback address unless `--insecure-http` says otherwise.
With one worker the app runs in this process. With N (`--workers`, `[service] workers`, default
one per CPU) this process is the supervisor: it runs start-up recovery once, keeps the deletion
sweeper, and uvicorn's supervisor runs N spawned workers on one socket (`http.workers`).
Either way SIGTERM/SIGINT drains requests, flushes every audit buffer, logs out and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import ssl
import sys
from pathlib import Path

from hsmbridge.config import Settings, load_settings
from hsmbridge.errors import ConfigError
from hsmbridge.http.compose import create_app, start_maintenance
from hsmbridge.http.logs import configure_logging
from hsmbridge.http.server import Tls, serve, serve_workers, tune_gc_for_serving
from hsmbridge.http.workers import FACTORY, default_workers, worker_environment
from hsmbridge.identity.credentials import load_principals

log = logging.getLogger(__name__)


DESCRIPTION = """\
Serve the KMS JSON API (and STS and CloudHSM v2) with SigV4 until SIGTERM or Ctrl-C, then shut
down gracefully. Prints the endpoint, the credentials to use and an `aws kms` command to paste.
Serves HTTPS when given a certificate and key (--tls-cert/--tls-key or [service] tls_cert and
tls_key); refuses plain HTTP on an address other than loopback unless --insecure-http is given.
"""


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser(
        "serve",
        help="serve the KMS JSON API over HTTP(S)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="path to hsmbridge.toml"
    )
    p.add_argument("--host", metavar="HOST", help="address to listen on (overrides listen_host)")
    p.add_argument("--port", type=int, metavar="PORT", help="port (overrides listen_port)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="server processes (overrides [service] workers; default: one per CPU, at most 8)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this PEM certificate chain (overrides [service] tls_cert)",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="the certificate's PEM private key (overrides [service] tls_key)",
    )
    p.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain HTTP on an address other than loopback",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects; both carry the request id",
    )
    p.set_defaults(handler=run)


def _banner(settings: Settings, host: str, port: int, workers: int, *, https: bool) -> str:
    endpoint = f"{'https' if https else 'http'}://{host}:{port}"
    creds = next(iter(load_principals(settings.credentials_file).values()), None)
    procs = "1 process" if workers == 1 else f"{workers} worker processes"
    lines = [f"hsmbridge serving the KMS API at {endpoint} (region {settings.region}, {procs})"]
    if creds is not None:
        # WARNING: stderr ends up in journald and container logs, so the banner names the secret
        # key's file instead of printing it; the command still works when pasted.
        secret = (
            f"$(sed -n 's/^aws_secret_access_key *= *//p' {settings.credentials_file} | head -n 1)"
        )
        env = (
            f"AWS_ACCESS_KEY_ID={creds.principal.access_key_id} "
            f'AWS_SECRET_ACCESS_KEY="{secret}" AWS_DEFAULT_REGION={settings.region}'
        )
        lines += [
            f"  credentials: {env}",
            f"  try:  {env} aws kms describe-custom-key-stores --endpoint-url {endpoint}",
        ]
    lines.append("  stop with Ctrl-C (graceful shutdown)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    json_logs = args.log_format == "json"
    configure_logging(logging.getLogger().level, json_format=json_logs)
    settings = load_settings(args.config)
    host = args.host or settings.listen_host
    port = args.port if args.port is not None else settings.listen_port
    workers = args.workers or settings.workers or default_workers()
    if workers < 1:
        print("hsmbridge serve: --workers must be at least 1", file=sys.stderr)
        return 2
    tls = _tls(args, settings)
    if tls is None and not is_loopback(host) and not args.insecure_http:
        print(
            f"hsmbridge serve: refusing to serve plain HTTP on {host!r}, which is not a loopback "
            "address: give --tls-cert and --tls-key (or [service] tls_cert and tls_key), or "
            "--insecure-http to serve plain HTTP anyway",
            file=sys.stderr,
        )
        return 2
    if workers == 1:
        return _serve_in_process(settings, host, port, tls)
    return _serve_with_workers(settings, host, port, workers, tls, json_logs=json_logs)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; anything else (including "" and 0.0.0.0) is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _tls(args: argparse.Namespace, settings: Settings) -> Tls | None:
    """The certificate and key from the command line, else from the configuration; checked to
    load here so a bad pair is one error line, not a failure in every worker."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    cert, key = (
        (args.tls_cert, args.tls_key)
        if args.tls_cert is not None
        else (settings.tls_cert, settings.tls_key)
    )
    if cert is None or key is None:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {cert} and key {key} do not load: {exc}") from None
    return Tls(cert_file=Path(cert).resolve(), key_file=Path(key).resolve())


def _serve_in_process(settings: Settings, host: str, port: int, tls: Tls | None) -> int:
    runtime = create_app(settings, server_processes=1)
    tune_gc_for_serving()
    try:
        print(_banner(settings, host, port, 1, https=tls is not None), file=sys.stderr, flush=True)
        serve(
            runtime.app,
            host,
            port,
            request_timeout_s=settings.request_timeout_s,
            max_request_bytes=settings.max_request_bytes,
            tls=tls,
        )
    finally:
        runtime.close()  # reached on SIGTERM/SIGINT too: http.server.serve returns, not re-raises
    return 0


def _serve_with_workers(
    settings: Settings, host: str, port: int, workers: int, tls: Tls | None, *, json_logs: bool
) -> int:
    # Recovery before any worker exists; the sweeper stays here for the server's lifetime.
    maintenance = start_maintenance(settings)
    try:
        level = logging.getLogger().level
        env = worker_environment(
            str(settings.config_path), json_logs=json_logs, log_level=level, workers=workers
        )
        os.environ.update(env)  # spawned workers inherit this process's environment
        banner = _banner(settings, host, port, workers, https=tls is not None)
        print(banner, file=sys.stderr, flush=True)
        started = serve_workers(
            FACTORY,
            host,
            port,
            workers=workers,
            request_timeout_s=settings.request_timeout_s,
            tls=tls,
        )
    finally:
        maintenance.close()
    if not started:
        log.error("a worker could not start; see its log lines above")
        return 1
    return 0
