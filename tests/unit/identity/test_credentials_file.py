"""The credentials file: account-root principals, `via_service`, and what each principal is."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmbridge.errors import ConfigError
from hsmbridge.identity.credentials import Principal, load_principals

ACCOUNT = "111122223333"


def _write(tmp_path: Path, *sections: str) -> Path:
    path = tmp_path / "credentials"
    path.write_text("\n".join(sections))
    path.chmod(0o600)
    return path


def _section(name: str, arn: str, extra: str = "") -> str:
    return (
        f"[{name}]\naws_access_key_id = AKIA{name.upper():0<16}\n"
        f"aws_secret_access_key = secret-{name}\nprincipal_arn = {arn}\n{extra}"
    )


def test_user_root_and_role_principals_and_their_types(tmp_path: Path) -> None:
    creds = load_principals(
        _write(
            tmp_path,
            _section("user", f"arn:aws:iam::{ACCOUNT}:user/eng/alice"),
            _section("root", "arn:aws:iam::444455556666:root"),
            _section("role", f"arn:aws:iam::{ACCOUNT}:role/service-role/App"),
        )
    )
    by_arn = {c.principal.arn: c.principal for c in creds.values()}
    user = by_arn[f"arn:aws:iam::{ACCOUNT}:user/eng/alice"]
    root = by_arn["arn:aws:iam::444455556666:root"]
    role = by_arn[f"arn:aws:iam::{ACCOUNT}:role/service-role/App"]
    assert (user.principal_type, user.account_id, user.via_service) == ("User", ACCOUNT, None)
    assert (root.principal_type, root.account_id) == ("Account", "444455556666")
    # A role key acts as the role itself; AWS's nearest caller type is a role session.
    assert role.principal_type == "AssumedRole"


def test_root_in_another_partition(tmp_path: Path) -> None:
    [cred] = load_principals(_write(tmp_path, _section("a", f"arn:aws-cn:iam::{ACCOUNT}:root")))
    assert load_principals(tmp_path / "credentials")[cred].principal.principal_type == "Account"


@pytest.mark.parametrize(
    "service", ["ec2.us-west-2.amazonaws.com", "rds.eu-central-1.amazonaws.com",
                "secretsmanager.us-gov-west-1.amazonaws.com", "iam.amazonaws.com"],
)  # fmt: skip
def test_via_service(tmp_path: Path, service: str) -> None:
    arn = f"arn:aws:iam::{ACCOUNT}:user/bob"
    [cred] = load_principals(_write(tmp_path, _section("a", arn, f"via_service = {service}\n")))
    principal = load_principals(tmp_path / "credentials")[cred].principal
    assert principal == Principal(cred, ACCOUNT, arn, service)
    assert principal.via_service == service


@pytest.mark.parametrize(
    "service",
    ["", "ec2", "amazonaws.com", "ec2.us-west-2.amazonaws.org", "EC2.us-west-2.amazonaws.com",
     "ec2.us-west-2.amazonaws.com.example.com", "https://ec2.amazonaws.com",
     "ec2..amazonaws.com", "ec2.uswest2.amazonaws.com", "-ec2.us-west-2.amazonaws.com"],
)  # fmt: skip
def test_bad_via_service(tmp_path: Path, service: str) -> None:
    path = _write(
        tmp_path, _section("a", f"arn:aws:iam::{ACCOUNT}:user/bob", f"via_service = {service}\n")
    )
    with pytest.raises(ConfigError, match=r"\[a\]: via_service .* is not an AWS service"):
        load_principals(path)


@pytest.mark.parametrize(
    "arn",
    [f"arn:aws:iam::{ACCOUNT}:root/x", "arn:aws:iam::11112222333:root", f"arn:aws:iam::{ACCOUNT}:",
     f"arn:aws:sts::{ACCOUNT}:assumed-role/R/s", f"arn:aws:iam::{ACCOUNT}:group/G",
     f"arn:aws:iam::{ACCOUNT}:user/", f"arn:aws:sts::{ACCOUNT}:root"],
)  # fmt: skip
def test_bad_principal_arns(tmp_path: Path, arn: str) -> None:
    with pytest.raises(ConfigError, match="nor an account root"):
        load_principals(_write(tmp_path, _section("a", arn)))


def test_principal_keeps_its_positional_fields() -> None:
    principal = Principal("AKID", ACCOUNT, f"arn:aws:iam::{ACCOUNT}:user/u")
    assert principal.via_service is None
    assert principal.principal_type == "User"
    assert Principal(
        "AKID", ACCOUNT, f"arn:aws:sts::{ACCOUNT}:assumed-role/R/s"
    ).principal_type == ("AssumedRole")
    with pytest.raises(ValueError, match="not a principal ARN"):
        _ = Principal("AKID", ACCOUNT, "*").principal_type
