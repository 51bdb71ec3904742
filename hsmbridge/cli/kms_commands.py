"""`hsmbridge keystore …` and `hsmbridge key …`: `aws kms`-style options → the KMS operation table.

Owns: the declarative list of subcommands, each naming its KMS operation and its options (spelled
like the `aws kms` options), and turning parsed options into a KMS request (`key create` can also
build its key policy the way the KMS console does, from administrators, users and external
accounts). The request then runs
through the same validation and handlers as the HTTP API, so output matches the wire exactly.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmbridge.errors import ValidationException
from hsmbridge.policy.console import console_key_policy

PASSWORD_ENV = "HSMBRIDGE_KEY_STORE_PASSWORD"  # noqa: S105 - a variable name
CONSOLE_HELP = "writes the key policy the way the KMS console does (not with --policy)"


@dataclass(frozen=True)
class Opt:
    flag: str  # e.g. "--custom-key-store-id"
    member: str  # e.g. "CustomKeyStoreId"
    # str | int | bool | text (file:// allowed) | tags | list | password, or console-list /
    # console-bool: inputs of the console's key policy generator, not KMS request members
    kind: str = "str"
    required: bool = False
    help: str = ""
    metavar: str | None = None  # like the `aws kms` docs' placeholders: ID, NAME, JSON, ...


@dataclass(frozen=True)
class Command:
    group: str
    name: str
    operation: str
    options: tuple[Opt, ...]
    help: str


STORE_ID = Opt(
    "--custom-key-store-id",
    "CustomKeyStoreId",
    required=True,
    help="the store's id (cks-...)",
    metavar="ID",
)
KEY_ID = Opt(
    "--key-id",
    "KeyId",
    required=True,
    metavar="KEY_ID",
    help="key id, key ARN, alias name (alias/NAME) or alias ARN",
)
LIMIT = Opt("--limit", "Limit", "int", help="one page of at most N items (1-1000)", metavar="N")
MARKER = Opt(
    "--marker",
    "Marker",
    help="the page after this NextMarker of a previous call",
    metavar="MARKER",
)
PASSWORD = Opt(
    "--key-store-password",
    "KeyStorePassword",
    "password",
    help="the kmsuser password",
    metavar="PASSWORD",
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "keystore",
        "create",
        "CreateCustomKeyStore",
        (
            Opt(
                "--custom-key-store-name",
                "CustomKeyStoreName",
                required=True,
                help="a name unique in the account and region",
                metavar="NAME",
            ),
            Opt(
                "--cloud-hsm-cluster-id",
                "CloudHsmClusterId",
                required=True,
                help="the cluster (cluster-...) whose HSMs hold the keys",
                metavar="ID",
            ),
            Opt(
                "--trust-anchor-certificate",
                "TrustAnchorCertificate",
                "text",
                required=True,
                help="the cluster's customerCA.crt (PEM)",
                metavar="PEM",
            ),
            PASSWORD,
        ),
        "create a CloudHSM custom key store (state DISCONNECTED)",
    ),
    Command(
        "keystore",
        "describe",
        "DescribeCustomKeyStores",
        (
            Opt(
                "--custom-key-store-id",
                "CustomKeyStoreId",
                help="only this store",
                metavar="ID",
            ),
            Opt(
                "--custom-key-store-name",
                "CustomKeyStoreName",
                help="only the store so named",
                metavar="NAME",
            ),
            LIMIT,
            MARKER,
        ),
        "describe one or all custom key stores",
    ),
    Command(
        "keystore",
        "connect",
        "ConnectCustomKeyStore",
        (STORE_ID,),
        "connect a store: log in to its cluster as kmsuser (waits for the result)",
    ),
    Command(
        "keystore",
        "disconnect",
        "DisconnectCustomKeyStore",
        (STORE_ID,),
        "disconnect a store; its keys become Unavailable",
    ),
    Command(
        "keystore",
        "update",
        "UpdateCustomKeyStore",
        (
            STORE_ID,
            Opt(
                "--new-custom-key-store-name",
                "NewCustomKeyStoreName",
                help="the new name",
                metavar="NAME",
            ),
            Opt(
                "--cloud-hsm-cluster-id",
                "CloudHsmClusterId",
                metavar="ID",
                help="a related cluster (one with the same cluster certificate)",
            ),
            PASSWORD,
        ),
        "rename a store, or change its kmsuser password or cluster (when disconnected)",
    ),
    Command(
        "keystore",
        "delete",
        "DeleteCustomKeyStore",
        (STORE_ID,),
        "delete a disconnected store that holds no keys",
    ),
    Command(
        "key",
        "create",
        "CreateKey",
        (
            Opt(
                "--origin",
                "Origin",
                help="AWS_CLOUDHSM for a key in a custom key store",
                metavar="ORIGIN",
            ),
            Opt(
                "--custom-key-store-id",
                "CustomKeyStoreId",
                help="the store (cks-...)",
                metavar="ID",
            ),
            Opt("--description", "Description", help="free text", metavar="TEXT"),
            Opt(
                "--key-usage",
                "KeyUsage",
                help="ENCRYPT_DECRYPT (the only one here)",
                metavar="USAGE",
            ),
            Opt(
                "--key-spec",
                "KeySpec",
                help="SYMMETRIC_DEFAULT (the only one here)",
                metavar="SPEC",
            ),
            Opt("--policy", "Policy", "text", help="the key policy document", metavar="JSON"),
            Opt(
                "--bypass-policy-lockout-safety-check",
                "BypassPolicyLockoutSafetyCheck",
                "bool",
                help="skip the check that the caller can still manage the key",
            ),
            Opt("--tags", "Tags", "tags", help="tags", metavar="TAG"),
            Opt(
                "--multi-region",
                "MultiRegion",
                "bool",
                help="multi-Region key (refused: not in a custom key store)",
            ),
            Opt(
                "--key-administrators",
                "KeyAdministrators",
                "console-list",
                metavar="ARN",
                help="IAM users or roles that may administer the key",
            ),
            Opt(
                "--key-users",
                "KeyUsers",
                "console-list",
                metavar="ARN",
                help="IAM users or roles that may use the key",
            ),
            Opt(
                "--external-accounts",
                "ExternalAccounts",
                "console-list",
                metavar="ACCOUNT",
                help="12-digit ids of other accounts that may use the key",
            ),
            Opt(
                "--administrator-delete",
                "AdministratorDelete",
                "console-bool",
                help="let the key administrators delete the key (the console's default)",
            ),
        ),
        "create a KMS key whose material is generated in the store's HSM",
    ),
    Command("key", "describe", "DescribeKey", (KEY_ID,), "describe a KMS key"),
    Command(
        "key",
        "list",
        "ListKeys",
        (LIMIT, MARKER),
        "list KMS keys",
    ),
)


def add_commands(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    for cmd in COMMANDS:
        # No abbreviations: `--key-store-password-f X` must never be read as another option, and
        # an unknown option must never be echoed back with a password in it.
        parser = groups[cmd.group].add_parser(
            cmd.name, help=cmd.help, description=cmd.help, allow_abbrev=False
        )
        parser.add_argument(
            "--config", required=True, type=Path, metavar="FILE", help="path to hsmbridge.toml"
        )
        for opt in cmd.options:
            _add_option(parser, opt)
        parser.set_defaults(kms_command=cmd)


def _add_option(parser: argparse.ArgumentParser, opt: Opt) -> None:
    dest = opt.member
    if opt.kind == "console-list":
        parser.add_argument(
            opt.flag, dest=dest, nargs="+", metavar=opt.metavar, help=f"{opt.help}; {CONSOLE_HELP}"
        )
    elif opt.kind in ("bool", "console-bool"):
        parser.add_argument(opt.flag, dest=dest, action="store_true", default=None, help=opt.help)
        parser.add_argument(
            "--no-" + opt.flag[2:],
            dest=dest,
            action="store_false",
            help=f"the opposite of {opt.flag}",
        )
    elif opt.kind == "tags":
        parser.add_argument(
            opt.flag,
            dest=dest,
            nargs="+",
            metavar=opt.metavar,
            help="TagKey=k,TagValue=v ... or a JSON list",
        )
    elif opt.kind == "password":
        parser.add_argument(
            opt.flag,
            dest=dest,
            metavar=opt.metavar,
            help=f"{opt.help}; or set {PASSWORD_ENV}, or use {opt.flag}-file",
        )
        parser.add_argument(
            opt.flag + "-file",
            dest=dest + "_file",
            type=Path,
            metavar="FILE",
            help="read the password from this file",
        )
    else:
        text = f"{opt.help} (file://PATH reads it from a file)" if opt.kind == "text" else opt.help
        parser.add_argument(
            opt.flag,
            dest=dest,
            required=opt.required,
            type=int if opt.kind == "int" else str,
            metavar=opt.metavar,
            help=text,
        )


def build_request(
    cmd: Command, args: argparse.Namespace, *, partition: str = "aws", account_id: str = ""
) -> dict[str, Any]:
    request: dict[str, Any] = {}
    for opt in cmd.options:
        if opt.kind.startswith("console"):
            continue
        value = getattr(args, opt.member, None)
        if opt.kind == "password":
            value = _password(value, getattr(args, opt.member + "_file", None), cmd.operation)
        elif value is not None and opt.kind == "text":
            value = _text(value)
        elif value is not None and opt.kind == "tags":
            value = parse_tags(value)
        if value is not None:
            request[opt.member] = value
    console = _console_policy(args, partition, account_id)
    if console is not None:
        if "Policy" in request:
            raise ValidationException(
                "Give either --policy or the key policy generator's options "
                "(--key-administrators, --key-users, --external-accounts), not both."
            )
        request["Policy"] = console
    return request


def _console_policy(args: argparse.Namespace, partition: str, account_id: str) -> str | None:
    """The key policy the KMS console would write for these options, or None if none given."""
    admins = getattr(args, "KeyAdministrators", None)
    users = getattr(args, "KeyUsers", None)
    external = getattr(args, "ExternalAccounts", None)
    admin_delete = getattr(args, "AdministratorDelete", None)
    if admins is None and users is None and external is None:
        if admin_delete is not None:
            raise ValidationException("--no-administrator-delete needs --key-administrators.")
        return None
    try:
        return console_key_policy(
            partition,
            account_id,
            key_administrators=admins or (),
            key_users=users or (),
            external_accounts=external or (),
            administrators_can_delete=admin_delete is not False,
        )
    except ValueError as exc:
        raise ValidationException(str(exc)) from None


def _text(value: str) -> str:
    if value.startswith("file://"):
        return Path(value[len("file://") :]).read_text(encoding="utf-8")
    return value


def _password(value: str | None, path: Path | None, operation: str) -> str | None:
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    if value is not None:
        return _text(value).strip()
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env is None and operation == "CreateCustomKeyStore":
        raise ValidationException(
            f"CreateCustomKeyStore needs --key-store-password, --key-store-password-file or "
            f"{PASSWORD_ENV}."
        )
    return from_env


def parse_tags(values: Sequence[str]) -> list[dict[str, str]]:
    """`aws` shorthand (`TagKey=k,TagValue=v` …) or one JSON list of {TagKey, TagValue}."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        parsed = json.loads(values[0])
        if not isinstance(parsed, list):
            raise ValidationException("--tags JSON must be a list of {TagKey, TagValue}.")
        return parsed
    tags = []
    for item in values:
        fields = dict(part.split("=", 1) for part in item.split(",") if "=" in part)
        if "TagKey" not in fields:
            raise ValidationException(f"--tags item {item!r} needs TagKey=...,TagValue=...")
        tags.append({"TagKey": fields["TagKey"], "TagValue": fields.get("TagValue", "")})
    return tags
