"""`hsmbridge doctor`: check a cluster end to end before trusting it with a custom key store.

Owns: the `doctor` parser, choosing the cluster, reading the kmsuser password (a file or the
environment, never argv) and the trust anchor, and the exit code. The checks themselves and
their one-line verdicts (`ok` / `FAIL ... — fix: ...` / `skip`) are `hsmbridge.cli.doctor_checks`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from hsmbridge import bootstrap
from hsmbridge.cli.doctor_checks import CHECKS, Doctor
from hsmbridge.cli.kmsuser_password import (
    PASSWORD_ENV,
    add_refused_password,
    read_password,
    read_text,
)
from hsmbridge.config import ClusterBinding, Settings
from hsmbridge.config import load_settings as _load_settings
from hsmbridge.errors import ConfigError

EXIT_USAGE = 2  # the checks' own exit codes (0, 1) are doctor_checks'

DESCRIPTION = """\
Check a cluster end to end before trusting it with a custom key store: the checks below run in
order through the same code the service uses, one line each:

  ok   CHECK: what was seen
  FAIL CHECK: what was seen — fix: one concrete action
  skip CHECK: why it could not run (an earlier failure, or an option not given)

then a summary line. The checks log in as the profile's crypto user (kmsuser), make one scratch
AES key labelled hsmbridge-doctor-<uuid4> and always destroy it again. Run it on the host that
will serve the store, with the configuration it will use.

checks:
""" + "".join(f"  {name:<15}{what}\n" for name, what in CHECKS)

EPILOG = f"""\
password: the crypto user's current password comes from --password-file (mode 0600) or
${PASSWORD_ENV}, never from the command line, and is never printed. A wrong password counts
toward the cluster's lockout of the crypto user like any failed login.

exit codes: 0 every check ok (an unrequested trust-anchor check is skipped); 1 a check failed;
2 usage or configuration error."""


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "check a cluster end to end before creating a custom key store on it"
    # WARNING: allow_abbrev=False, or argparse would read `--password X` as `--password-file X`
    # and then print the password as a missing file's name.
    p = top.add_parser(
        "doctor",
        help=help_text,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="path to hsmbridge.toml")
    p.add_argument(
        "--cluster",
        metavar="ID",
        help="the cluster to check (default: the only [[clusters]] entry of the configuration)",
    )
    p.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help=f"a file holding the crypto user's password (or ${PASSWORD_ENV})",
    )
    p.add_argument(
        "--trust-anchor",
        type=Path,
        metavar="FILE",
        help="the customerCA.crt to verify the cluster certificate with (default: not checked)",
    )
    add_refused_password(p)
    p.set_defaults(handler=run)


# --- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    settings: Settings
    binding: ClusterBinding
    anchor_pem: str | None


def run(args: argparse.Namespace) -> int:
    try:
        inputs = _inputs(args)
        password = read_password(
            args.password_file, "the doctor logs in as the crypto user and needs its password"
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # No secret-file check: the doctor opens neither the master key nor the metadata.
    bootstrap.prepare_host(inputs.settings)
    doctor = Doctor(inputs.settings, inputs.binding, inputs.anchor_pem, sys.stdout)
    return doctor.run(password)


def _inputs(args: argparse.Namespace) -> _Inputs:
    if args.config is None:
        raise ConfigError("--config is required")
    settings = _load_settings(args.config)
    choices = ", ".join(sorted(settings.clusters)) or "none"
    if args.cluster is None:
        if len(settings.clusters) != 1:
            raise ConfigError(
                f"{args.config} has {len(settings.clusters)} [[clusters]] entries ({choices}): "
                "name one with --cluster ID"
            )
        (cluster_id,) = settings.clusters
    else:
        cluster_id = args.cluster
    binding = settings.binding(cluster_id)
    if binding is None:
        raise ConfigError(
            f"cluster {cluster_id} has no [[clusters]] entry in {args.config} (there: {choices})"
        )
    anchor = None
    if args.trust_anchor is not None:
        anchor = read_text(args.trust_anchor, "trust anchor")
    return _Inputs(settings, binding, anchor)
