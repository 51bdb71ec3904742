"""Run one `keystore`/`key` subcommand against the configured service (opened by `bootstrap`).

Owns: opening the service for one command (synchronous connect, no background sweeper, no
start-up recovery: a running server owns recovery), running the request through the operation
table as the CLI's principal (`cli_caller`), writing the same audit-trail line an API call writes,
printing the response, and reporting a connect that ended FAILED.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hsmbridge import bootstrap
from hsmbridge.cli.kms_commands import Command, build_request
from hsmbridge.cli.output import print_json
from hsmbridge.config import Settings, load_settings
from hsmbridge.errors import KmsError, KMSInternalException
from hsmbridge.identity.credentials import cli_principal
from hsmbridge.model import ConnectionState
from hsmbridge.protocol.errors import status_for
from hsmbridge.protocol.operations import build_operations, dispatch
from hsmbridge.protocol.validation import redact_params
from hsmbridge.request import CLI_USER_AGENT, RequestContext
from hsmbridge.service.kms import KmsService
from hsmbridge.trail.calls import api_event, audit_event
from hsmbridge.trail.context import RequestScope, request_scope
from hsmbridge.trail.events import AuditSink, JsonLinesSink
from hsmbridge.trail.hsm_calls import TimedConnector
from hsmbridge.trail.sinks import RequestAwareSink

EXIT_OK, EXIT_FAILED = 0, 1
# Operations `aws kms` pages through (botocore's kms paginators-1.json), and each one's result key.
# Without --limit or --marker the AWS CLI fetches every page and prints the merged result key
# only (no Truncated, no NextMarker); with either one it prints the single response as is.
PAGINATED = {"ListKeys": "Keys", "DescribeCustomKeyStores": "CustomKeyStores"}


def open_cli_service(settings: Settings) -> tuple[KmsService, JsonLinesSink]:
    """The service and its write-through audit file, both from `hsmbridge.bootstrap`."""
    sink = bootstrap.open_audit_log(settings)  # refuses exposed secrets before creating it
    try:
        # Timed like the server's, so a CLI action's audit line carries hsmLatencyMs too.
        connector = TimedConnector(bootstrap.default_connector(settings))
        service = bootstrap.open_service(
            settings,
            connector=connector,
            audit=RequestAwareSink(sink),
            synchronous_connect=True,
        )
    except BaseException:
        sink.close()
        raise
    return service, sink


def cli_caller(settings: Settings) -> RequestContext:
    """The principal CLI commands act as: the credentials file's section named by `[cli] profile`
    (default `default`, the demo administrator `hsmbridge init` writes), authorized and audited
    like an API caller."""
    principal = cli_principal(settings.credentials_file, settings.cli_profile)
    return RequestContext(
        principal.arn,
        principal.account_id,
        user_agent=CLI_USER_AGENT,
        edge="cli",
        via_service=principal.via_service,
    )


def run_kms_command(args: argparse.Namespace) -> int:
    cmd: Command = args.kms_command
    settings = load_settings(args.config)
    request = build_request(cmd, args, partition=settings.partition, account_id=settings.account_id)
    caller = cli_caller(settings)
    service, sink = open_cli_service(settings)
    try:
        if cmd.operation in PAGINATED and "Limit" not in request and "Marker" not in request:
            response = _all_pages(service, sink, caller, cmd.operation, request)
        else:
            response = run_audited(service, sink, caller, cmd.operation, request)
        print_json(response)
        if cmd.operation == "ConnectCustomKeyStore":
            return _connect_outcome(service, caller, request["CustomKeyStoreId"])
        return EXIT_OK
    finally:
        service.close()
        sink.close()


def run_audited(
    service: KmsService,
    sink: AuditSink,
    caller: RequestContext,
    operation: str,
    request: dict[str, Any],
) -> dict[str, Any]:
    """Run one operation as `caller` and write the audit-trail line an API call would."""
    started = time.perf_counter()
    status, error_code = 200, None
    with request_scope(RequestScope(caller.request_id, operation)) as scope:
        try:
            return dispatch(build_operations(service), caller, operation, request)
        except KmsError as exc:
            status, error_code = status_for(exc), exc.code
            raise
        except Exception:
            status, error_code = 500, KMSInternalException.code
            raise
        finally:
            event = api_event(
                scope,
                operation=operation,
                principal_arn=caller.principal_arn,
                source_ip=None,
                status=status,
                error_code=error_code,
                duration_ms=(time.perf_counter() - started) * 1000.0,
                params_redacted=redact_params(operation, request),
            )
            sink.emit(audit_event(event))


def _all_pages(
    service: KmsService,
    sink: AuditSink,
    caller: RequestContext,
    operation: str,
    request: dict[str, Any],
) -> dict[str, Any]:
    """Every page of a list operation merged, shaped like `aws kms` auto-pagination prints it."""
    key = PAGINATED[operation]
    items: list[Any] = []
    page_request = dict(request)
    while True:
        page = run_audited(service, sink, caller, operation, page_request)
        items.extend(page.get(key, []))
        marker = page.get("NextMarker")
        if not page.get("Truncated") or not marker:
            return {key: items}
        page_request = {**request, "Marker": marker}


def _connect_outcome(service: KmsService, caller: RequestContext, store_id: str) -> int:
    store = service.keystores.describe(caller, store_id).items[0]
    if store.connection_state is ConnectionState.FAILED:
        code = store.connection_error_code.value if store.connection_error_code else "UNKNOWN"
        print(
            f"ConnectionState FAILED ({code}) for {store_id}; disconnect it, fix the cause and "
            "connect again.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"ConnectionState {store.connection_state.value} for {store_id}", file=sys.stderr)
    return EXIT_OK
