"""`hsmbridge audit`: the key-label audit of a custom key store, from the command line.

Owns: the `audit`, `audit find` and `audit delete-orphans` parsers, and composing an audit run:
the HSM login (the store's stored kmsuser password with `--keystore`; a password file or env var
with `--cluster`, never argv), the metadata source (hsmbridge's metadata, or a KMS endpoint via
boto3), the audit log sink, and exit codes. The audit logic itself lives in `hsmbridge.audit`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hsmbridge import bootstrap
from hsmbridge.audit import (
    AuditReport,
    AuditScope,
    KmsApiSource,
    KmsSourceUnreachableError,
    MetadataSource,
    Outcome,
    Progress,
    Severity,
    StoreMetadataSource,
    delete_orphans,
    find_material,
    make_kms_client,
    material_dict,
    plan_orphan_deletion,
    run_audit,
)
from hsmbridge.backend import (
    DeviceLostError,
    HsmBackend,
    HsmUnreachableError,
    LoginError,
    TransientHsmError,
)
from hsmbridge.backend.templates import violations
from hsmbridge.cli import audit_view as view
from hsmbridge.cli.kmsuser_password import (
    PASSWORD_ENV,
    add_refused_password,
    read_password,
)
from hsmbridge.config import Settings, load_settings
from hsmbridge.errors import ConfigError
from hsmbridge.ids import is_key_id
from hsmbridge.model import ConnectionState
from hsmbridge.trail.events import AuditSink, JsonLinesSink

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# What exit 3 means for an audit: the HSM (or the KMS endpoint) cannot be reached, is too busy or
# went away, or refused the kmsuser login.
_UNREACHABLE = (
    HsmUnreachableError,
    DeviceLostError,
    TransientHsmError,
    LoginError,
    KmsSourceUnreachableError,
)

EPILOG = f"""\
sources: with --keystore the HSM is opened with the store's stored kmsuser password and compared
with hsmbridge's metadata (or with a KMS endpoint: --source kms). With --cluster (standalone, for
staging) the kmsuser password comes from --password-file or ${PASSWORD_ENV}, never from the
command line, and the KMS keys come from a KMS endpoint (boto3 credentials; --kms-endpoint-url).

severities: missing_material critical; duplicate_label, non_compliant high; orphaned_material,
misplaced_material medium; foreign_label, not_kms_arn, id_mismatch low; in_flight info.

exit codes: 0 clean (no finding at or above --fail-on); 1 findings at or above --fail-on (find: not
exactly one compliant key, e.g. nothing matched; delete-orphans: orphans listed in a dry run, or a
deletion failed); 2 usage or configuration error; 3 HSM or KMS endpoint unreachable (or login
refused); 4 internal error."""


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "key-label audit: reconcile the HSM's keys with KMS metadata"
    # WARNING: allow_abbrev=False, or argparse would read `--password X` as `--password-file X`
    # and then print the password as a missing file's name.
    p = top.add_parser(
        "audit",
        help=help_text,
        description=help_text,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_common(p, suppress=False)
    p.set_defaults(handler=run, audit_command="scan")
    sub = p.add_subparsers(dest="audit_command", metavar="{find,delete-orphans}")
    find_help = "show the HSM key(s) of one KMS key"
    find = sub.add_parser(
        "find",
        help=find_help,
        description=find_help,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    find.add_argument(
        "key",
        metavar="KEY",
        help="KMS key ARN (or key id of this account and region), not an alias",
    )
    _add_common(find, suppress=True)
    clean_help = "destroy orphaned key material (dry run unless --yes)"
    clean = sub.add_parser(
        "delete-orphans",
        help=clean_help,
        description=clean_help,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    clean.add_argument("--yes", action="store_true", help="destroy without asking")
    _add_common(clean, suppress=True)


def _add_common(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Subcommands repeat the options with SUPPRESS defaults so they may come before or after the
    # subcommand name without the subparser's defaults overwriting values given before it.
    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--config", type=Path, default=d(None), metavar="FILE", help="path to hsmbridge.toml"
    )
    p.add_argument("--keystore", default=d(None), metavar="ID", help="custom key store id")
    p.add_argument("--cluster", default=d(None), metavar="ID", help="standalone: cluster id")
    p.add_argument(
        "--password-file",
        type=Path,
        default=d(None),
        metavar="FILE",
        help=f"standalone: a file holding the kmsuser password (or ${PASSWORD_ENV})",
    )
    p.add_argument(
        "--source",
        choices=("metadata", "kms"),
        default=d(None),
        help="compare with hsmbridge's metadata or a KMS endpoint (default: metadata with "
        "--keystore, kms with --cluster or --kms-endpoint-url)",
    )
    p.add_argument(
        "--kms-endpoint-url", default=d(None), metavar="URL", help="KMS endpoint for --source kms"
    )
    p.add_argument(
        "--region", default=d(None), metavar="REGION", help="KMS region (default: the config's)"
    )
    p.add_argument(
        "--output",
        choices=[f.value for f in view.AuditFormat],
        default=d(None),
        help="default: table on a terminal, json otherwise",
    )
    p.add_argument(
        "--fail-on",
        default=d("medium"),
        metavar="SEVERITY",
        help="exit 1 on findings of this severity or worse: critical, high, medium, low or info "
        "(default: medium)",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        default=d(False),
        help="show the progress bar on stderr even when it is not a terminal",
    )
    add_refused_password(p)


@dataclass
class _Target:
    hsm: HsmBackend
    source: MetadataSource
    scope: AuditScope
    audit: AuditSink


def run(args: argparse.Namespace) -> int:
    try:
        fail_on = Severity.parse(args.fail_on)
        if args.config is None:
            raise ConfigError("--config is required")
        settings = load_settings(args.config)
        fmt = view.AuditFormat(args.output) if args.output else view.default_format(sys.stdout)
        progress = view.StderrProgress() if args.progress or sys.stderr.isatty() else None
        if args.audit_command == "find":
            _refuse_alias(args.key)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _open_target(args, settings, progress) as target:
            if args.audit_command == "find":
                return _find(target, args.key, fmt)
            report = _scan(target, progress)
            if args.audit_command == "delete-orphans":
                return _delete_orphans(target, report, args.yes, fmt)
            view.print_report(report, fmt)
            return EXIT_FINDINGS if report.at_or_above(fail_on) else EXIT_OK
    except _UNREACHABLE as exc:
        # BackendError messages name labels, tokens and reasons, never the PIN. Other backend
        # errors (an unmapped return code, a rejected template) are not "unreachable": they
        # reach main's handler and exit 4 as internal errors.
        print(f"error: unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _scan(target: _Target, progress: view.StderrProgress | None) -> AuditReport:
    try:
        report = run_audit(target.hsm, target.source, target.scope, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    print(view.summary_line(report), file=sys.stderr)
    return report


@contextmanager
def _open_target(
    args: argparse.Namespace, settings: Settings, progress: Progress | None
) -> Iterator[_Target]:
    if args.cluster is not None:
        with _standalone(args, settings, progress) as target:
            yield target
        return
    if args.keystore is None:
        raise ConfigError("name the store with --keystore ID, or --cluster ID for standalone")
    from hsmbridge.cli.runner import open_cli_service

    service, sink = open_cli_service(settings)
    try:
        row = service.ctx.store_row(args.keystore)
        store = row.store
        if store.connection_state is not ConnectionState.CONNECTED:
            print(
                f"note: {store.store_id} is {store.connection_state.value}; logging in as the "
                "crypto user with its stored password for this audit",
                file=sys.stderr,
            )
        hsm = service.ctx.connections.get(
            store.store_id, store.cluster_id, lambda: service.ctx.password_of(row)
        )
        scope = _scope(settings, store.store_id, store.cluster_id)
        if _source_kind(args) == "kms":
            source: MetadataSource = _kms_source(args, settings, scope, progress)
        else:
            source = StoreMetadataSource(service.ctx.meta, store.store_id)
        yield _Target(hsm, source, scope, sink)
    finally:
        service.close()
        sink.close()


@contextmanager
def _standalone(
    args: argparse.Namespace, settings: Settings, progress: Progress | None
) -> Iterator[_Target]:
    if _source_kind(args) != "kms":
        raise ConfigError("--cluster audits compare with a KMS endpoint; drop --source metadata")
    if settings.binding(args.cluster) is None:
        raise ConfigError(f"cluster {args.cluster} has no [[clusters]] entry in {args.config}")
    password = read_password(args.password_file, "--cluster needs the kmsuser password")
    # No secret-file check: a standalone audit opens neither the master key nor the metadata.
    bootstrap.prepare_host(settings)
    scope = _scope(settings, args.keystore, args.cluster)
    source = _kms_source(args, settings, scope, progress)
    hsm = bootstrap.default_connector(settings).connect(args.cluster, password)
    del password  # WARNING: the password lives no longer than the login needs it
    sink = JsonLinesSink(settings.audit_log, settings.audit)
    try:
        yield _Target(hsm, source, scope, sink)
    finally:
        hsm.close()
        sink.close()


def _source_kind(args: argparse.Namespace) -> str:
    if args.source is not None:
        return str(args.source)
    return "kms" if args.cluster is not None or args.kms_endpoint_url else "metadata"


def _scope(settings: Settings, store_id: str | None, cluster_id: str) -> AuditScope:
    return AuditScope(
        settings.partition, settings.account_id, settings.region, store_id, cluster_id
    )


def _kms_source(
    args: argparse.Namespace, settings: Settings, scope: AuditScope, progress: Progress | None
) -> KmsApiSource:
    client = make_kms_client(args.region or settings.region, args.kms_endpoint_url)
    return KmsApiSource(
        client,
        custom_key_store_id=scope.custom_key_store_id,
        cluster_id=scope.cluster_id,
        progress=progress,
    )


def _refuse_alias(key: str) -> None:
    """HSM keys carry their KMS key's ARN, never an alias: an alias would match nothing."""
    if key.startswith("alias/") or ":alias/" in key:
        raise ConfigError(
            f"audit find takes a key ARN or key id, not an alias ({key}): HSM keys are labelled "
            f"with their KMS key's ARN; `hsmbridge key describe --key-id {key}` prints it"
        )


def _find(target: _Target, key: str, fmt: view.AuditFormat) -> int:
    arn = target.scope.key_arn(key) if is_key_id(key) else key
    infos = find_material(target.hsm, arn)
    view.print_keys([material_dict(i) for i in infos], fmt)
    if not infos:
        # Exit 1 like any finding: a KMS key without an HSM key is missing_material.
        scope = target.scope
        where = f"cluster {scope.cluster_id}"
        if scope.custom_key_store_id is not None:
            where = f"{scope.custom_key_store_id} ({where})"
        print(
            f"nothing matched: no secret key labelled {arn} on the token of {where}",
            file=sys.stderr,
        )
    compliant = len(infos) == 1 and not violations(infos[0])
    return EXIT_OK if compliant else EXIT_FINDINGS


def _delete_orphans(target: _Target, report: AuditReport, yes: bool, fmt: view.AuditFormat) -> int:
    plan = plan_orphan_deletion(report)
    if plan and not yes and sys.stdin.isatty():
        yes = _confirm(len(plan))
    if not plan or not yes:
        view.print_deletions(plan, dry_run=True, fmt=fmt)
        if plan:
            print(f"dry run: {len(plan)} orphan(s) listed; --yes destroys them", file=sys.stderr)
        return EXIT_FINDINGS if plan else EXIT_OK
    orphans = [p.finding for p in plan]
    outcomes = delete_orphans(target.hsm, target.source, target.scope, orphans, target.audit)
    view.print_deletions(outcomes, dry_run=False, fmt=fmt)
    deleted = sum(o.outcome is Outcome.DELETED for o in outcomes)
    print(f"destroyed {deleted} of {len(plan)} orphaned HSM key(s)", file=sys.stderr)
    return EXIT_FINDINGS if any(o.outcome is Outcome.FAILED for o in outcomes) else EXIT_OK


def _confirm(count: int) -> bool:
    prompt = f"Destroy {count} orphaned HSM key(s)? This cannot be undone. [y/N] "
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")
