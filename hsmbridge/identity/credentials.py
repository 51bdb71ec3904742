"""Principals and their access keys: the `credentials` file every edge authenticates against.

Owns: `Principal` (who an access key belongs to: account and IAM ARN), `Credential` (a principal
with its secret access key) and `load_principals`, which parses the AWS shared-credentials-style
INI file hsmbridge keeps (one section per access key: `aws_access_key_id`,
`aws_secret_access_key`, `principal_arn`). The HTTP edge verifies SigV4 with it; the CLI acts as
one of its principals (`cli_principal`).
Must not import anything from hsmbridge but `errors`.
WARNING: secret access keys live only in `Credential.secret`; never log or repr them.
"""

from __future__ import annotations

import configparser
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from hsmbridge.errors import ConfigError

_PRINCIPAL_ARN_RE: Final = re.compile(
    r"^arn:aws(?:-[a-z]+)*:iam::(?P<account>\d{12}):(?:user|role)/[\w+=,.@/-]{1,512}$"
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who signed a request: the access key, its account and its IAM ARN."""

    access_key_id: str
    account_id: str
    arn: str


@dataclass(frozen=True, slots=True)
class Credential:
    principal: Principal
    secret: str = field(repr=False)


def _check_permissions(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"credentials file {path} is not readable: {exc.strerror}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(f"credentials file {path} is world-readable; run chmod o-r {path}")


def load_principals(path: Path | str) -> dict[str, Credential]:
    """Parse an AWS shared-credentials-style INI file into {access key id: credential}.

    Each section needs `aws_access_key_id`, `aws_secret_access_key` and `principal_arn`.
    """
    path = Path(path)
    _check_permissions(path)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"credentials file {path} cannot be read: {exc}") from None
    creds: dict[str, Credential] = {}
    for name in parser.sections():
        section = parser[name]
        where = f"{path}: [{name}]"
        missing = [
            k
            for k in ("aws_access_key_id", "aws_secret_access_key", "principal_arn")
            if not section.get(k)
        ]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        arn = section["principal_arn"].strip()
        match = _PRINCIPAL_ARN_RE.match(arn)
        if match is None:
            raise ConfigError(f"{where}: principal_arn {arn!r} is not an IAM user or role ARN")
        akid = section["aws_access_key_id"].strip()
        if akid in creds:
            raise ConfigError(f"{where}: access key {akid} appears twice")
        principal = Principal(akid, match["account"], arn)
        creds[akid] = Credential(principal, section["aws_secret_access_key"].strip())
    if not creds:
        raise ConfigError(f"credentials file {path} defines no principals")
    return creds


def cli_principal(path: Path | str, profile: str = "default") -> Principal:
    """The principal the CLI acts as: the credentials file's `profile` section (`hsmbridge
    init` writes the demo administrator to `default`)."""
    creds = load_principals(path)
    parser = configparser.ConfigParser(interpolation=None)
    with Path(path).open(encoding="utf-8") as fh:
        parser.read_file(fh)
    if not parser.has_section(profile):
        raise ConfigError(
            f"credentials file {path} has no [{profile}] section for the CLI to act as; set "
            "[cli] profile in the configuration to one of its sections"
        )
    return creds[parser[profile]["aws_access_key_id"].strip()].principal
