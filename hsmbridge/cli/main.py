"""`hsmbridge` entry point: argparse subcommands, `main(argv) -> int`, documented exit codes.

Owns: the subcommand table and error reporting (each command opens its service through
`hsmbridge.bootstrap`). Exit codes:
0 ok; 1 findings or an operation that ended FAILED; 2 usage, configuration or request error;
3 HSM or cluster unreachable. A KMS error prints one line `ExceptionName: message`; anything else
prints a generic line, with the traceback only under `-v`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hsmbridge import __version__
from hsmbridge.cli import kms_commands
from hsmbridge.errors import ConfigError, HsmbridgeError, KmsError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
_UNREACHABLE = frozenset(
    {"KeyUnavailableException", "DependencyTimeoutException", "KMSInternalException"}
)

log = logging.getLogger("hsmbridge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="hsmbridge",
        description="AWS KMS CloudHSM custom key stores on any PKCS#11 HSM.",
        epilog="exit codes: 0 ok, 1 findings/failed, 2 usage or config error, 3 HSM unreachable",
    )
    parser.add_argument("--version", action="version", version=f"hsmbridge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    top = parser.add_subparsers(dest="command", required=True)

    from hsmbridge.cli.audit_cmd import add_parser as add_audit
    from hsmbridge.cli.init_cmd import add_parser as add_init
    from hsmbridge.cli.serve_cmd import add_parser as add_serve

    add_init(top)
    add_serve(top)
    add_audit(top)
    groups = {
        "keystore": top.add_parser("keystore", help="custom key stores").add_subparsers(
            dest="subcommand", required=True
        ),
        "key": top.add_parser("key", help="KMS keys").add_subparsers(
            dest="subcommand", required=True
        ),
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
    except KmsError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code in _UNREACHABLE else EXIT_USAGE
    except (ConfigError, HsmbridgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        if args.verbose:
            log.exception("unexpected error")
        print(
            "error: an unexpected internal error occurred (run with -v for details)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE


def entry() -> None:
    sys.exit(main())
