"""The "Create key" wizard's state and rules, step by step, without any I/O.

Owns: `WizardState` (everything entered so far; it travels between steps in one hidden form
field, so any worker process can serve the next step, and the service re-checks all of it),
`apply` (a step's controls into the state), `check_step` (the step's own rules, as field errors),
`refresh_policy` (the console key policy generator of `policy.console`, statement for statement,
kept when the person has edited it), `create_key_params` and `error_step` (which step a KMS
error of CreateKey or CreateAlias belongs to).

Steps: 1 alias, description, key material origin; 2 custom key store; 3 tags; 4 key
administrators; 5 key users and other AWS accounts; 6 the key policy.
Must not import uvicorn, pkcs11 or the service layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from hsmbridge.policy.console import console_key_policy

STEPS: Final = (
    "Configure key",
    "Choose a custom key store",
    "Add tags",
    "Define key administrative permissions",
    "Define key usage permissions",
    "Review and edit key policy",
)
LAST_STEP: Final = len(STEPS)
ORIGIN_CLOUDHSM: Final = "AWS_CLOUDHSM"
_ALIAS_RE: Final = re.compile(r"^[a-zA-Z0-9/_-]+$")
_ACCOUNT_RE: Final = re.compile(r"^\d{12}$")
MAX_TAGS: Final = 50
MAX_ACCOUNTS: Final = 20

Errors = dict[str, str]  # field name ("alias", "store", "tag_key.0", "policy", ...) -> message


@dataclass(slots=True)
class WizardState:
    alias: str = ""
    description: str = ""
    origin: str = ORIGIN_CLOUDHSM
    store_id: str = ""
    tags: list[list[str]] = field(default_factory=lambda: [["", ""]])  # [key, value] rows
    admins: list[str] = field(default_factory=list)
    admin_delete: bool = True
    users: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    policy: str = ""
    generated: str = ""  # the policy as last generated: an edit is a difference from it

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> WizardState:
        """The state from the hidden field; anything malformed starts afresh."""
        try:
            raw = json.loads(text) if text else {}
        except ValueError:
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        state = cls()
        for name in ("alias", "description", "origin", "store_id", "policy", "generated"):
            if isinstance(raw.get(name), str):
                setattr(state, name, raw[name])
        for name in ("admins", "users", "accounts"):
            values = raw.get(name)
            if isinstance(values, list):
                setattr(state, name, [v for v in values if isinstance(v, str)])
        tags = raw.get("tags")
        if isinstance(tags, list):
            rows = [
                [str(t[0]), str(t[1])] for t in tags if isinstance(t, list | tuple) and len(t) == 2
            ]
            state.tags = rows[:MAX_TAGS] or [["", ""]]
        if isinstance(raw.get("admin_delete"), bool):
            state.admin_delete = raw["admin_delete"]
        return state

    @property
    def alias_name(self) -> str:
        alias = self.alias.strip()
        return alias if alias.startswith("alias/") else f"alias/{alias}"

    @property
    def filled_tags(self) -> list[tuple[str, str]]:
        return [(k.strip(), v) for k, v in self.tags if k.strip() or v]

    @property
    def policy_edited(self) -> bool:
        return bool(self.policy) and self.policy != self.generated


def apply(state: WizardState, step: int, form: Mapping[str, list[str]]) -> None:
    """Take the controls of `step` from a submitted form into `state`."""

    def one(name: str) -> str:
        values = form.get(name)
        return values[0] if values else ""

    if step == 1:
        state.alias = one("alias").strip()
        state.description = one("description")
        state.origin = one("origin") or state.origin
    elif step == 2:
        state.store_id = one("store")
    elif step == 3:
        keys, values = form.get("tag_key", []), form.get("tag_value", [])
        rows = [[k, values[i] if i < len(values) else ""] for i, k in enumerate(keys)]
        state.tags = rows[:MAX_TAGS] or [["", ""]]
    elif step == 4:
        state.admins = list(dict.fromkeys(form.get("admin", [])))
        state.admin_delete = one("admin_delete") == "yes"
    elif step == 5:
        state.users = list(dict.fromkeys(form.get("user", [])))
        state.accounts = [a.strip() for a in form.get("account", [])][:MAX_ACCOUNTS]
    elif step == 6:
        state.policy = one("policy")


def check_step(
    state: WizardState,
    step: int,
    *,
    own_account: str,
    choosable_stores: Sequence[str] = (),
    known_principals: Sequence[str] = (),
) -> Errors:
    """The rules of one step; the service checks everything again on Finish."""
    errors: Errors = {}
    if step == 1:
        _check_alias(state, errors)
        _check_origin(state, errors)
    elif step == 2:
        _check_store(state, choosable_stores, errors)
    elif step == 3:
        _check_tags(state, errors)
    elif step == 4:
        _check_principals(state.admins, "admin", known_principals, own_account, errors)
    elif step == 5:
        _check_principals(state.users, "user", known_principals, own_account, errors)
        _check_accounts(state.accounts, own_account, errors)
    elif step == 6:
        policy_error = check_policy_json(state.policy)
        if policy_error:
            errors["policy"] = policy_error
    return errors


def _check_origin(state: WizardState, errors: Errors) -> None:
    if len(state.description) > 8192:
        errors["description"] = "The description must be at most 8192 characters long."
    if state.origin != ORIGIN_CLOUDHSM:
        errors["origin"] = (
            "This endpoint keeps keys in custom key stores only: choose Custom key store "
            "(CloudHSM)."
        )


def _check_store(state: WizardState, choosable: Sequence[str], errors: Errors) -> None:
    if not state.store_id:
        errors["store"] = "Choose a custom key store."
    elif state.store_id not in choosable:
        errors["store"] = (
            f"The custom key store {state.store_id} cannot be chosen: it is not CONNECTED "
            "or does not exist."
        )


def _check_principals(
    arns: Sequence[str], name: str, known: Sequence[str], own_account: str, errors: Errors
) -> None:
    for arn in arns:
        if arn not in known:
            errors[name] = f"{arn} is not an IAM user or role of account {own_account}."


def _check_accounts(accounts: Sequence[str], own_account: str, errors: Errors) -> None:
    for i, account in enumerate(accounts):
        if not _ACCOUNT_RE.match(account):
            errors[f"account.{i}"] = "An AWS account ID is 12 digits."
        elif account == own_account:
            errors[f"account.{i}"] = (
                "This is the key's own account; choose its users under This account."
            )


def _check_alias(state: WizardState, errors: Errors) -> None:
    alias = state.alias.strip()
    bare = alias.removeprefix("alias/")
    if not bare:
        errors["alias"] = "Enter an alias for the key."
    elif len(state.alias_name) > 256:
        errors["alias"] = "The alias must be at most 256 characters long (with alias/)."
    elif not _ALIAS_RE.match(bare):
        errors["alias"] = (
            "An alias may contain only letters, digits, slashes (/), underscores (_) and "
            "dashes (-)."
        )
    elif bare.lower().startswith("aws/"):
        errors["alias"] = "Aliases that begin with aws/ are reserved for AWS managed keys."


def _check_tags(state: WizardState, errors: Errors) -> None:
    seen: set[str] = set()
    for i, (raw_key, value) in enumerate(state.tags):
        key = raw_key.strip()
        if not key and not value:
            continue
        if not key:
            errors[f"tag_key.{i}"] = "Enter a tag key, or clear the tag value."
        elif len(key) > 128:
            errors[f"tag_key.{i}"] = "A tag key must be at most 128 characters long."
        elif key.lower().startswith("aws:"):
            errors[f"tag_key.{i}"] = "Tag keys that begin with aws: are reserved for AWS."
        elif key in seen:
            errors[f"tag_key.{i}"] = f"The tag key {key} is used twice."
        if len(value) > 256:
            errors[f"tag_value.{i}"] = "A tag value must be at most 256 characters long."
        seen.add(key)


def check_policy_json(policy: str) -> str | None:
    if not policy.strip():
        return "Enter a key policy."
    try:
        document = json.loads(policy)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return f"The key policy is not valid JSON: {exc.msg} ({where})."
    if not isinstance(document, dict):
        return "The key policy must be a JSON object."
    return None


def refresh_policy(state: WizardState, partition: str, account_id: str) -> bool:
    """Generate the console key policy for steps 4 and 5; an edited policy is kept (True)."""
    if state.policy_edited:
        return True
    state.policy = state.generated = console_key_policy(
        partition,
        account_id,
        key_administrators=state.admins,
        key_users=state.users,
        external_accounts=state.accounts,
        administrators_can_delete=state.admin_delete,
    )
    return False


def create_key_params(state: WizardState) -> dict[str, Any]:
    params: dict[str, Any] = {
        "Origin": state.origin,
        "CustomKeyStoreId": state.store_id,
        "Policy": state.policy,
    }
    if state.description:
        params["Description"] = state.description
    tags = state.filled_tags
    if tags:
        params["Tags"] = [{"TagKey": k, "TagValue": v} for k, v in tags]
    return params


# The step each KMS error of CreateKey/CreateAlias belongs to; any other error: the last step.
_ERROR_STEPS: Final[Mapping[str, int]] = {
    "AlreadyExistsException": 1,
    "InvalidAliasNameException": 1,
    "CustomKeyStoreInvalidStateException": 2,
    "CustomKeyStoreNotFoundException": 2,
    "CloudHsmClusterInvalidConfigurationException": 2,
    "CloudHsmClusterNotActiveException": 2,
    "CloudHsmClusterNotFoundException": 2,
    "TagException": 3,
}


def error_step(code: str) -> int:
    return _ERROR_STEPS.get(code, LAST_STEP)
