"""`hsmbridge` entry point: argparse subcommands, `main(argv) -> int`, documented exit codes.

Owns: the subcommand table and error reporting (each command opens its service through
`hsmbridge.bootstrap`). Exit codes:
0 ok; 1 findings or an operation that ended FAILED; 2 usage, configuration or request error;
3 HSM or cluster unreachable (or the kmsuser login refused); 4 internal error. A KMS error prints
one line `ExceptionName: message`; an unexpected exception (a bug) prints one
`KMSInternalException: ...` line and exits 4, never 3, with the traceback logged at debug level
(shown under `-v`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hsmbridge import __version__
from hsmbridge.backend import BackendError
from hsmbridge.cli import kms_commands
from hsmbridge.errors import (
    ConfigError,
    DependencyTimeoutException,
    HsmbridgeError,
    KeyUnavailableException,
    KmsError,
    KMSInternalException,
)
from hsmbridge.service.hsm_errors import to_kms_error

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERNAL = 0, 1, 2, 3, 4
# The KMS errors that mean "the HSM or the cluster could not be reached": the retryable faults
# `service.hsm_errors.to_kms_error` makes of an unreachable, busy or lost HSM and of a refused
# kmsuser login, and the one `service.clusters` makes of an unreadable cloudhsmv2 inventory.
# KMSInternalException is not among them: it is a bug or a broken installation (exit 4).
# CloudHsmClusterNotFound/NotActive are answers from a reachable inventory about the request (2).
_UNREACHABLE: tuple[type[KmsError], ...] = (KeyUnavailableException, DependencyTimeoutException)

log = logging.getLogger("hsmbridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="hsmbridge",
        description="AWS KMS CloudHSM custom key stores on any PKCS#11 HSM.",
        epilog="exit codes: 0 ok, 1 findings/failed, 2 usage or config error, 3 HSM unreachable, "
        "4 internal error",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"hsmbridge {__version__}",
        help="print the version and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    top = parser.add_subparsers(dest="command", required=True)

    from hsmbridge.cli.audit_cmd import add_parser as add_audit
    from hsmbridge.cli.doctor_cmd import add_parser as add_doctor
    from hsmbridge.cli.init_cmd import add_parser as add_init
    from hsmbridge.http.serve_cmd import add_parser as add_serve

    add_init(top)
    add_doctor(top)
    add_serve(top)
    add_audit(top)
    groups = {
        "keystore": top.add_parser(
            "keystore",
            help="custom key stores",
            description="CloudHSM custom key stores, like `aws kms ...-custom-key-store(s)`.",
        ).add_subparsers(dest="subcommand", required=True),
        "key": top.add_parser(
            "key", help="KMS keys", description="KMS keys, like `aws kms create-key` and co."
        ).add_subparsers(dest="subcommand", required=True),
    }
    kms_commands.add_commands(groups)
    return parser


def _reject_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """argparse would echo unknown arguments with their values, and a value may be a password:
    name the options only."""
    names = [a.split("=", 1)[0] for a in unknown if a.startswith("-")] or ["(positional)"]
    parser.print_usage(sys.stderr)
    print(
        f"hsmbridge: error: unrecognized arguments: {' '.join(names)} (values not shown)",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, unknown)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command; every failure becomes one line on stderr and an exit code."""
    try:
        if getattr(args, "kms_command", None) is not None:
            from hsmbridge.cli.runner import run_kms_command

            return run_kms_command(args)
        result: int = args.handler(args)
        return result
    except (KmsError, BackendError) as exc:
        # A backend error no service method translated is reported as the KMS error it stands for.
        kms = exc if isinstance(exc, KmsError) else to_kms_error(exc)
        print(f"{kms.code}: {kms.message}", file=sys.stderr)
        return _kms_exit_code(kms)
    except (ConfigError, HsmbridgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # A bug (or a broken installation), not an unreachable HSM: exit 4, not 3. The message
        # names the exception class only: an unexpected exception's text may quote any value.
        log.debug("unexpected error", exc_info=True)
        print(
            f"{KMSInternalException.code}: unexpected {type(exc).__name__} inside hsmbridge "
            "(run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _kms_exit_code(exc: KmsError) -> int:
    if isinstance(exc, _UNREACHABLE):
        return EXIT_UNREACHABLE
    if isinstance(exc.__cause__, ConfigError):
        return EXIT_USAGE  # e.g. an unreadable static cluster inventory: fix the configuration
    return EXIT_INTERNAL if exc.fault else EXIT_USAGE


def entry() -> None:
    sys.exit(main())
