"""`hsmbridge serve --config PATH`: run the KMS HTTP API until SIGTERM/SIGINT.

Owns: starting the server from the configuration and printing how to reach it: the endpoint, a
credential pair from the credentials file, and an `aws kms` command that works when pasted.
With one worker the app runs in this process. With N (`--workers`, `[service] workers`, default
one per CPU) this process is the supervisor: it runs start-up recovery once, keeps the deletion
sweeper, and uvicorn's supervisor runs N spawned workers on one socket (`http.workers`).
Either way SIGTERM/SIGINT drains requests, flushes every audit buffer, logs out and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hsmbridge.config import Settings, load_settings
from hsmbridge.http.compose import create_app, start_maintenance
from hsmbridge.http.logs import configure_logging
from hsmbridge.http.server import serve, serve_workers
from hsmbridge.http.workers import FACTORY, default_workers, worker_environment
from hsmbridge.identity.credentials import load_principals

log = logging.getLogger(__name__)


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser("serve", help="serve the KMS JSON API over HTTP")
    p.add_argument("--config", type=Path, required=True, help="path to hsmbridge.toml")
    p.add_argument("--host", help="override listen_host")
    p.add_argument("--port", type=int, help="override listen_port")
    p.add_argument(
        "--workers",
        type=int,
        help="server processes (overrides [service] workers; default: one per CPU, at most 8)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects; both carry the request id",
    )
    p.set_defaults(handler=run)


def _banner(settings: Settings, host: str, port: int, workers: int) -> str:
    endpoint = f"http://{host}:{port}"
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
    if workers == 1:
        return _serve_in_process(settings, host, port)
    return _serve_with_workers(settings, host, port, workers, json_logs=json_logs)


def _serve_in_process(settings: Settings, host: str, port: int) -> int:
    runtime = create_app(settings)
    try:
        print(_banner(settings, host, port, 1), file=sys.stderr, flush=True)
        serve(
            runtime.app,
            host,
            port,
            request_timeout_s=settings.request_timeout_s,
            max_request_bytes=settings.max_request_bytes,
        )
    finally:
        runtime.close()  # reached on SIGTERM/SIGINT too: http.server.serve returns, not re-raises
    return 0


def _serve_with_workers(
    settings: Settings, host: str, port: int, workers: int, *, json_logs: bool
) -> int:
    # Recovery before any worker exists; the sweeper stays here for the server's lifetime.
    maintenance = start_maintenance(settings)
    try:
        level = logging.getLogger().level
        env = worker_environment(str(settings.config_path), json_logs=json_logs, log_level=level)
        os.environ.update(env)  # spawned workers inherit this process's environment
        print(_banner(settings, host, port, workers), file=sys.stderr, flush=True)
        started = serve_workers(
            FACTORY, host, port, workers=workers, request_timeout_s=settings.request_timeout_s
        )
    finally:
        maintenance.close()
    if not started:
        log.error("a worker could not start; see its log lines above")
        return 1
    return 0
