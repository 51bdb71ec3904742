"""The composition root: from a `Settings` to a running `KmsService`, for every entry point.

Owns nothing but wiring. It reads only a `Settings` and builds everything below the edges: the
start-up checks (`prepare`: secret-file permissions, HSM environment, data directory), the
metadata store the configuration names, the audit trail file, the HSM connector and the service.
The HTTP server (`http.compose`), the CLI, the benchmarks and the test fixtures all open their
service here and nowhere else; the edges add only what is theirs (metrics, SigV4, the ASGI app).

    service = open_service(settings, audit=open_audit_log(settings), synchronous_connect=True)

Modules: `secret_files` (the refusal of exposed secrets), `host` (prepare), `metadata` (the
store), `audit_log` (the audit file), `connector` (the default HSM connector), `service`
(open_service). Must not import api, cli or uvicorn.
"""

from hsmbridge.bootstrap.audit_log import open_audit_log, open_buffered_audit_log
from hsmbridge.bootstrap.connector import default_connector
from hsmbridge.bootstrap.host import prepare, prepare_host
from hsmbridge.bootstrap.metadata import open_metadata_store
from hsmbridge.bootstrap.secret_files import (
    DEMO_SECRET_FILES,
    check_private,
    check_secret_files,
    secret_files,
)
from hsmbridge.bootstrap.service import open_service

__all__ = [
    "DEMO_SECRET_FILES",
    "check_private",
    "check_secret_files",
    "default_connector",
    "open_audit_log",
    "open_buffered_audit_log",
    "open_metadata_store",
    "open_service",
    "prepare",
    "prepare_host",
    "secret_files",
]
