"""Principals and their access keys: the `credentials` file every edge authenticates against.

Owns: `Principal` (who an access key belongs to: account and IAM ARN), `Credential` (a principal
with its secret access key) and `load_principals`, which parses the AWS shared-credentials-style
INI file hsmbridge keeps (one section per access key: `aws_access_key_id`,
`aws_secret_access_key`, `principal_arn`, optional `via_service`). The HTTP edge verifies SigV4
with it; the CLI acts as one of its principals (`cli_principal`).

`principal_arn` is one of:
- `arn:aws:iam::ACCOUNT:user/[path/]NAME`: an IAM user (`principal_type` "User"); its identity
  policies come from the account's IAM file (`hsmbridge.identity.iam`).
- `arn:aws:iam::ACCOUNT:root`: the account itself (`principal_type` "Account"), like AWS's root
  user credentials. It has no identity policies; key policies grant it access.
- `arn:aws:iam::ACCOUNT:role/[path/]NAME`: kept for backwards compatibility. The key acts as the
  role itself, without an STS session: it is evaluated with the role's identity policies and
  matches key-policy principals that name the role ARN. AWS has no long-term keys for a role;
  the nearest caller type is a role session, so `principal_type` is "AssumedRole".

`via_service = NAME[.REGION].amazonaws.com` marks the principal as an AWS service acting for it
(e.g. `ec2.us-west-2.amazonaws.com` for EBS): its calls carry `kms:ViaService` with that value and
`kms:GrantIsForAWSResource` = true.
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
    r"^arn:aws(?:-[a-z]+)*:iam::(?P<account>\d{12}):"
    r"(?:(?:user|role)/[\w+=,.@/-]{1,512}|root)$"
)
# `<service>.<region>.amazonaws.com` or `<service>.amazonaws.com` (global services).
_VIA_SERVICE_RE: Final = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z]{2}(?:-[a-z]+)+-\d{1,2})?\.amazonaws\.com$"
)
# aws:PrincipalType for each kind of principal ARN (see the module docstring for "role"); the
# STS kinds serve principals built for sessions rather than read from the file.
_PRINCIPAL_TYPES: Final = {
    "user": "User",
    "role": "AssumedRole",
    "root": "Account",
    "assumed-role": "AssumedRole",
    "federated-user": "FederatedUser",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who signed a request: the access key, its account and its IAM ARN."""

    access_key_id: str
    account_id: str
    arn: str
    # The AWS service (`NAME[.REGION].amazonaws.com`) acting for this principal, if any: its
    # calls carry kms:ViaService with this value and kms:GrantIsForAWSResource = true.
    via_service: str | None = None

    @property
    def principal_type(self) -> str:
        """aws:PrincipalType: "Account" (root), "User", or "AssumedRole" (a role ARN, which acts
        as the role itself; AWS has no caller type for a role without a session)."""
        kind = self.arn.split(":", 5)[-1].split("/", 1)[0]
        try:
            return _PRINCIPAL_TYPES[kind]
        except KeyError:
            raise ValueError(f"{self.arn!r} is not a principal ARN") from None


def caller_principal_type(arn: str) -> str:
    """aws:PrincipalType of any caller ARN (users, roots, roles and their sessions; anything
    else is a service principal), for the request context's principal."""
    if arn.endswith(":root"):
        return "Account"
    if ":assumed-role/" in arn or ":role/" in arn:
        return "AssumedRole"
    if ":user/" in arn:
        return "User"
    return "AWSService"


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


def _via_service(section: configparser.SectionProxy, where: str) -> str | None:
    if "via_service" not in section:
        return None
    value = section["via_service"].strip()
    if _VIA_SERVICE_RE.match(value) is None:
        raise ConfigError(
            f"{where}: via_service {value!r} is not an AWS service endpoint name "
            "(NAME.REGION.amazonaws.com or NAME.amazonaws.com, e.g. ec2.us-west-2.amazonaws.com)"
        )
    return value


def load_principals(path: Path | str) -> dict[str, Credential]:
    """Parse an AWS shared-credentials-style INI file into {access key id: credential}.

    Each section needs `aws_access_key_id`, `aws_secret_access_key` and `principal_arn` (an IAM
    user, role or account-root ARN); `via_service` is optional.
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
            raise ConfigError(
                f"{where}: principal_arn {arn!r} is not an IAM user or role ARN "
                "nor an account root (arn:aws:iam::ACCOUNT:root)"
            )
        via_service = _via_service(section, where)
        akid = section["aws_access_key_id"].strip()
        if akid in creds:
            raise ConfigError(f"{where}: access key {akid} appears twice")
        principal = Principal(akid, match["account"], arn, via_service)
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
