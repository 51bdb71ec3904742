"""The "Create key" wizard's pages: each step shown, submitted, checked, and Finish.

Owns: `show_start` (step 1, empty) and `submit` (one POST of any step: its controls taken into the
state, then Next / Previous / Cancel / Add tag / Add another AWS account / Remove / Finish).
Next runs the step's rules (`wizard.check_step`), with what the caller may see: the custom key
stores from DescribeCustomKeyStores (only CONNECTED ones can be chosen), the account's IAM users
and roles, and for the alias whether ListAliases already lists it. Finish runs CreateKey and then
CreateAlias as the caller; a KMS error is shown with its name and message on the step it belongs
to (`wizard.error_step`), with everything entered kept.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hsmbridge.console import wizard
from hsmbridge.console.directory import ClusterSummary
from hsmbridge.console.pages import key_detail
from hsmbridge.console.troubleshooting import why_not_choosable
from hsmbridge.console.view import ErrorText, Page
from hsmbridge.console.web import Response, redirect
from hsmbridge.console.wizard import LAST_STEP, WizardState
from hsmbridge.errors import KmsError


@dataclass(frozen=True, slots=True)
class StoreChoice:
    store_id: str
    name: str
    cluster_id: str
    state: str
    reason: str | None  # why it cannot be chosen; None: it can
    cluster: ClusterSummary


def show_start(page: Page) -> Response:
    return _show(page, WizardState(), 1)


def submit(page: Page) -> Response:
    form = page.request.form
    state = WizardState.load(page.request.field("wizard"))
    try:
        step = min(max(int(page.request.field("step", "1")), 1), LAST_STEP)
    except ValueError:
        step = 1
    wizard.apply(state, step, form)
    action = page.request.field("action", "next")
    if action == "cancel":
        return redirect("/console/keys")
    if action == "back":
        return _show(page, state, max(step - 1, 1))
    if action.startswith(("add_", "remove_")):
        return _show(page, state, step, focus=_edit_rows(state, step, action))
    errors = _check(page, state, step)
    if errors:
        return _show(page, state, step, errors=errors, status=400)
    if action == "finish" and step == LAST_STEP:
        return _finish(page, state)
    return _next(page, state, step)


def _next(page: Page, state: WizardState, step: int) -> Response:
    """The step after a checked one; the key policy is generated on the way to the last."""
    notice = None
    if step == LAST_STEP - 1 and wizard.refresh_policy(
        state, page.partition, page.caller.account_id
    ):
        notice = "The key policy keeps your edits; it was not regenerated from steps 4 and 5."
    return _show(page, state, min(step + 1, LAST_STEP), notice=notice)


def _edit_rows(state: WizardState, step: int, action: str) -> str | None:
    """Add tag / Add another AWS account / Remove; returns the id of a new row's first field."""
    if action == "add_tag" and step == 3 and len(state.tags) < wizard.MAX_TAGS:
        state.tags.append(["", ""])
        return f"tag_key_{len(state.tags) - 1}"
    if action == "add_account" and step == 5 and len(state.accounts) < wizard.MAX_ACCOUNTS:
        state.accounts.append("")
        return f"account_{len(state.accounts) - 1}"
    if action.startswith(("remove_tag:", "remove_account:")):
        _remove_row(state, action)
    return None


def _remove_row(state: WizardState, action: str) -> None:
    kind, _, index = action.partition(":")
    rows: list[Any] = state.tags if kind == "remove_tag" else state.accounts
    if index.isdigit() and int(index) < len(rows):
        del rows[int(index)]
    if kind == "remove_tag" and not state.tags:
        state.tags.append(["", ""])


def _check(page: Page, state: WizardState, step: int) -> wizard.Errors:
    account = page.caller.account_id
    if step == 2:
        choosable = [s.store_id for s in _stores(page) if s.reason is None]
        return wizard.check_step(state, 2, own_account=account, choosable_stores=choosable)
    if step in (4, 5):
        users, roles = page.directory.principals(account)
        return wizard.check_step(state, step, own_account=account, known_principals=users + roles)
    errors = wizard.check_step(state, step, own_account=account)
    if step == 1 and not errors and _alias_taken(page, state.alias_name):
        errors["alias"] = f"An alias named {state.alias_name} already exists in this account."
    return errors


def _alias_taken(page: Page, alias_name: str) -> bool:
    """Whether ListAliases lists it; a caller who may not list aliases learns it on Finish."""
    try:
        aliases = page.all_pages("ListAliases", "Aliases", {"Limit": 100})
    except KmsError:
        return False
    return any(a.get("AliasName") == alias_name for a in aliases)


def _stores(page: Page) -> list[StoreChoice]:
    stores = page.all_pages("DescribeCustomKeyStores", "CustomKeyStores", {"Limit": 100})
    out = []
    for s in stores:
        state = s.get("ConnectionState", "")
        out.append(
            StoreChoice(
                s["CustomKeyStoreId"],
                s.get("CustomKeyStoreName", ""),
                s.get("CloudHsmClusterId", ""),
                state,
                why_not_choosable(state),
                page.directory.cluster(s.get("CloudHsmClusterId", "")),
            )
        )
    return sorted(out, key=lambda c: (c.name, c.store_id))


def _finish(page: Page, state: WizardState) -> Response:
    try:
        created = page.run("CreateKey", wizard.create_key_params(state))
    except KmsError as exc:
        return _show(page, state, wizard.error_step(exc.code), error=ErrorText.of(exc), status=400)
    key_id = created["KeyMetadata"]["KeyId"]
    try:
        page.run("CreateAlias", {"AliasName": state.alias_name, "TargetKeyId": key_id})
    except KmsError as exc:
        # The key exists now: say so on its page, with why the alias is missing.
        return key_detail(page, key_id, alias_error=ErrorText.of(exc), status=400)
    return redirect(f"/console/keys/{key_id}?created=1")


def _show(
    page: Page,
    state: WizardState,
    step: int,
    *,
    errors: wizard.Errors | None = None,
    error: ErrorText | None = None,
    notice: str | None = None,
    focus: str | None = None,
    status: int = 200,
) -> Response:
    context: dict[str, Any] = {"stores": [], "users": [], "roles": []}
    if step == 2:
        try:
            context["stores"] = _stores(page)
        except KmsError as exc:
            error = error or ErrorText.of(exc)
            status = 400
    if step in (4, 5):
        context["users"], context["roles"] = page.directory.principals(page.caller.account_id)
    store_name = ""
    if step == LAST_STEP and state.store_id:
        store_name = state.store_id
    return page.html(
        "create_key.html",
        status=status,
        title=f"Create key: step {step} of {LAST_STEP}",
        nav="keys",
        step=step,
        steps=wizard.STEPS,
        state=state,
        state_json=state.dump(),
        errors=errors or {},
        error=error,
        notice=notice,
        focus=focus,
        store_name=store_name,
        **context,
    )
