"""`hsmbridge serve --config PATH`: run the KMS HTTP API until SIGTERM/SIGINT.

Owns: starting the server from the configuration and printing how to reach it: the endpoint, a
credential pair from the credentials file, and an `aws kms` command that works when pasted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hsmbridge.api.auth import load_principals
from hsmbridge.api.compose import create_app
from hsmbridge.api.logs import configure_logging
from hsmbridge.api.server import serve
from hsmbridge.config import Settings, load_settings


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser("serve", help="serve the KMS JSON API over HTTP")
    p.add_argument("--config", type=Path, required=True, help="path to hsmbridge.toml")
    p.add_argument("--host", help="override listen_host")
    p.add_argument("--port", type=int, help="override listen_port")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or as JSON objects; both carry the request id",
    )
    p.set_defaults(handler=run)


def _banner(settings: Settings, host: str, port: int) -> str:
    endpoint = f"http://{host}:{port}"
    creds = next(iter(load_principals(settings.credentials_file).values()), None)
    lines = [f"hsmbridge serving the KMS API at {endpoint} (region {settings.region})"]
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
    configure_logging(logging.getLogger().level, json_format=args.log_format == "json")
    settings = load_settings(args.config)
    host = args.host or settings.listen_host
    port = args.port if args.port is not None else settings.listen_port
    runtime = create_app(settings)
    try:
        print(_banner(settings, host, port), file=sys.stderr, flush=True)
        serve(
            runtime.app,
            host,
            port,
            request_timeout_s=settings.request_timeout_s,
            max_request_bytes=settings.max_request_bytes,
        )
    finally:
        runtime.close()
    return 0
