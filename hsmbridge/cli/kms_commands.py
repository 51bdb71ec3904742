"""`hsmbridge keystore …` and `hsmbridge key …`: `aws kms`-style options → the KMS operation table.

Owns: the declarative list of subcommands, each naming its KMS operation and its options (spelled
like the `aws kms` options), and turning parsed options into a KMS request. The request then runs
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

PASSWORD_ENV = "HSMBRIDGE_KEY_STORE_PASSWORD"  # noqa: S105 - a variable name


@dataclass(frozen=True)
class Opt:
    flag: str  # e.g. "--custom-key-store-id"
    member: str  # e.g. "CustomKeyStoreId"
    kind: str = "str"  # str | int | bool | text (file:// allowed) | tags | list | password
    required: bool = False


@dataclass(frozen=True)
class Command:
    group: str
    name: str
    operation: str
    options: tuple[Opt, ...]
    help: str


STORE_ID = Opt("--custom-key-store-id", "CustomKeyStoreId", required=True)
KEY_ID = Opt("--key-id", "KeyId", required=True)

COMMANDS: tuple[Command, ...] = (
    Command(
        "keystore",
        "create",
        "CreateCustomKeyStore",
        (
            Opt("--custom-key-store-name", "CustomKeyStoreName", required=True),
            Opt("--cloud-hsm-cluster-id", "CloudHsmClusterId", required=True),
            Opt("--trust-anchor-certificate", "TrustAnchorCertificate", "text", required=True),
            Opt("--key-store-password", "KeyStorePassword", "password"),
        ),
        "create a CloudHSM custom key store (state DISCONNECTED)",
    ),
    Command(
        "keystore",
        "describe",
        "DescribeCustomKeyStores",
        (
            Opt("--custom-key-store-id", "CustomKeyStoreId"),
            Opt("--custom-key-store-name", "CustomKeyStoreName"),
            Opt("--limit", "Limit", "int"),
            Opt("--marker", "Marker"),
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
            Opt("--new-custom-key-store-name", "NewCustomKeyStoreName"),
            Opt("--cloud-hsm-cluster-id", "CloudHsmClusterId"),
            Opt("--key-store-password", "KeyStorePassword", "password"),
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
            Opt("--origin", "Origin"),
            Opt("--custom-key-store-id", "CustomKeyStoreId"),
            Opt("--description", "Description"),
            Opt("--key-usage", "KeyUsage"),
            Opt("--key-spec", "KeySpec"),
            Opt("--policy", "Policy", "text"),
            Opt("--tags", "Tags", "tags"),
            Opt("--multi-region", "MultiRegion", "bool"),
        ),
        "create a KMS key whose material is generated in the store's HSM",
    ),
    Command("key", "describe", "DescribeKey", (KEY_ID,), "describe a KMS key"),
    Command(
        "key",
        "list",
        "ListKeys",
        (
            Opt("--limit", "Limit", "int"),
            Opt("--marker", "Marker"),
        ),
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
        parser.add_argument("--config", required=True, type=Path, help="path to hsmbridge.toml")
        for opt in cmd.options:
            _add_option(parser, opt)
        parser.set_defaults(kms_command=cmd)


def _add_option(parser: argparse.ArgumentParser, opt: Opt) -> None:
    dest = opt.member
    if opt.kind == "bool":
        parser.add_argument(opt.flag, dest=dest, action="store_true", default=None)
        parser.add_argument("--no-" + opt.flag[2:], dest=dest, action="store_false")
    elif opt.kind == "tags":
        parser.add_argument(
            opt.flag, dest=dest, nargs="+", help="TagKey=k,TagValue=v ... or a JSON list"
        )
    elif opt.kind == "password":
        parser.add_argument(
            opt.flag, dest=dest, help=f"or set {PASSWORD_ENV}, or use {opt.flag}-file"
        )
        parser.add_argument(
            opt.flag + "-file",
            dest=dest + "_file",
            type=Path,
            help="read the password from this file",
        )
    else:
        parser.add_argument(
            opt.flag,
            dest=dest,
            required=opt.required,
            type=int if opt.kind == "int" else str,
            help="file://PATH reads the value from a file" if opt.kind == "text" else None,
        )


def build_request(cmd: Command, args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    for opt in cmd.options:
        value = getattr(args, opt.member, None)
        if opt.kind == "password":
            value = _password(value, getattr(args, opt.member + "_file", None), cmd.operation)
        elif value is not None and opt.kind == "text":
            value = _text(value)
        elif value is not None and opt.kind == "tags":
            value = parse_tags(value)
        if value is not None:
            request[opt.member] = value
    return request


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
