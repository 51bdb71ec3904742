"""Run one `keystore`/`key` subcommand against the configured service (the CLI's composition root).

Owns: opening the service for one command (synchronous connect, no background sweeper, no
start-up recovery: a running server owns recovery), running the request through the operation
table, printing the response, and reporting a connect that ended FAILED.
"""

from __future__ import annotations

import argparse
import sys

from hsmbridge.api.operations import build_operations, dispatch
from hsmbridge.api.startup import check_secret_files
from hsmbridge.audit.events import JsonLinesSink
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.cli.kms_commands import Command, build_request
from hsmbridge.cli.output import print_json
from hsmbridge.config import Settings, load_settings
from hsmbridge.model import ConnectionState
from hsmbridge.service.kms import KmsService, open_service

EXIT_OK, EXIT_FAILED = 0, 1


def open_cli_service(settings: Settings) -> tuple[KmsService, JsonLinesSink]:
    check_secret_files(settings)  # before the metadata store would quietly chmod the DB
    settings.apply_hsm_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sink = JsonLinesSink(settings.audit_log)
    service = open_service(
        settings, Pkcs11Connector(settings.clusters), audit=sink, synchronous_connect=True
    )
    return service, sink


def run_kms_command(args: argparse.Namespace) -> int:
    cmd: Command = args.kms_command
    settings = load_settings(args.config)
    request = build_request(cmd, args)
    service, sink = open_cli_service(settings)
    try:
        response = dispatch(build_operations(service), cmd.operation, request)
        print_json(response)
        if cmd.operation == "ConnectCustomKeyStore":
            return _connect_outcome(service, request["CustomKeyStoreId"])
        return EXIT_OK
    finally:
        service.close()
        sink.close()


def _connect_outcome(service: KmsService, store_id: str) -> int:
    store = service.keystores.describe(store_id).items[0]
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
