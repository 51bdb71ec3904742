"""Building the console over a running service, for the HTTP edge's composition (`http.compose`).

Owns: `build_console`: the operation table of the same `KmsService` the API serves, the same
per-call event hook (audit line and metrics), the credentials the SigV4 verifier checks, the IAM
directory and cluster facts the service already loaded, and the session key derived from the
server key in `sts.key` (`bootstrap.sessions`; `session.console_key`), with sign-outs recorded in
the service's metadata store.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

from hsmbridge.bootstrap.sessions import load_or_create_session_key, session_key_path
from hsmbridge.config import Settings
from hsmbridge.console.app import ConsoleApp
from hsmbridge.console.calls import Operations
from hsmbridge.console.directory import Directory
from hsmbridge.console.session import SessionCodec, console_key
from hsmbridge.identity.credentials import Credential
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.protocol.operations import build_operations
from hsmbridge.service.kms import KmsService
from hsmbridge.trail.calls import ApiEvent

BODY_TIMEOUT_S: Final = 10.0


def build_console(
    settings: Settings,
    service: KmsService,
    credentials: Mapping[str, Credential],
    on_event: Callable[[ApiEvent], None] | None,
) -> ConsoleApp:
    iam = service.ctx.iam
    if iam is None:  # ServiceContext always sets it; typed Optional for its constructor
        iam = IamDirectory(settings.iam_dir)
    key = console_key(load_or_create_session_key(session_key_path(settings)))
    return ConsoleApp(
        operations=Operations(
            build_operations(service), on_event, timeout_s=settings.request_timeout_s
        ),
        directory=Directory(iam, service.ctx.clusters),
        credentials=credentials,
        # Sign-outs live in the metadata: every worker and instance refuses a signed-out cookie.
        codec=SessionCodec(key, sign_outs=service.ctx.meta),
        region=settings.region,
        partition=settings.partition,
        on_event=on_event,
        max_request_bytes=settings.max_request_bytes,
        body_timeout_s=BODY_TIMEOUT_S,
    )
