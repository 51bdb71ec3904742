"""The "Customer managed keys" list, its column preferences, and the key detail page.

Owns: `key_list` (one page of ListKeys, DescribeKey per key shown and ListAliases, as the caller;
the columns the browser's preferences cookie names; Next page / First page links),
`save_preferences` (the gear's checkboxes, remembered per browser in a cookie), `key_detail`
(general configuration, cryptographic configuration with the custom key store's name and ID and
the CloudHSM cluster ID, key policy, aliases, tags; a section the caller may not read says why)
and `key_action` (enable, disable, schedule and cancel deletion, edit the key policy; each one
operation, its KMS error shown on the page with the input kept).
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

from hsmbridge.console.view import ErrorText, Page
from hsmbridge.console.web import Response, redirect
from hsmbridge.console.wizard import check_policy_json
from hsmbridge.errors import KmsError


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    label: str
    default: bool


COLUMNS: Final = (
    Column("aliases", "Aliases", True),
    Column("key_id", "Key ID", True),
    Column("status", "Status", True),
    Column("origin", "Origin", True),
    Column("created", "Created", True),
    Column("description", "Description", False),
    Column("store_id", "Custom key store ID", False),
    Column("cluster_id", "CloudHSM cluster ID", False),
    Column("key_spec", "Key spec", False),
    Column("key_usage", "Key usage", False),
)
FIXED_COLUMNS: Final = frozenset({"key_id"})  # always shown: the link to the key
PREFERENCES_COOKIE: Final = "hsmbridge-console-columns"
PREFERENCES_MAX_AGE: Final = 400 * 24 * 3600
KEYS_PER_PAGE: Final = 50
ORIGIN_LABELS: Final = {"AWS_CLOUDHSM": "CloudHSM", "AWS_KMS": "AWS KMS", "EXTERNAL": "External"}
MIN_WINDOW_DAYS, MAX_WINDOW_DAYS, DEFAULT_WINDOW_DAYS = 7, 30, 30


def chosen_columns(cookie: str | None) -> list[Column]:
    names = {c.name for c in COLUMNS}
    if cookie:
        wanted = {n for n in cookie.split(":") if n in names} | FIXED_COLUMNS
    else:
        wanted = {c.name for c in COLUMNS if c.default}
    return [c for c in COLUMNS if c.name in wanted]


def key_list(page: Page) -> Response:
    """One page of KEYS_PER_PAGE keys (ListKeys order; the newest first within the page), so a
    view costs one DescribeKey per key shown, not per key in the account."""
    columns = chosen_columns(page.request.cookies.get(PREFERENCES_COOKIE))
    marker = page.request.query.get("marker") or None
    error: ErrorText | None = None
    rows: list[dict[str, Any]] = []
    next_marker: str | None = None
    try:
        params: dict[str, Any] = {"Limit": KEYS_PER_PAGE}
        if marker is not None:
            params["Marker"] = marker
        listed = page.run("ListKeys", params)
        if listed.get("Truncated"):
            next_marker = listed.get("NextMarker")
        aliases: dict[str, list[str]] = {}
        try:
            for a in page.all_pages("ListAliases", "Aliases", {"Limit": 100}):
                if a.get("TargetKeyId"):
                    aliases.setdefault(a["TargetKeyId"], []).append(a["AliasName"])
        except KmsError:
            pass  # a caller who may not list aliases still sees its keys
        for entry in listed.get("Keys", []):
            meta = page.run("DescribeKey", {"KeyId": entry["KeyId"]})["KeyMetadata"]
            rows.append(_row(meta, aliases.get(meta["KeyId"], [])))
    except KmsError as exc:
        error = ErrorText.of(exc)
    rows.sort(key=lambda r: r["created_epoch"], reverse=True)
    return page.html(
        "keys.html",
        status=400 if error else 200,
        title="Customer managed keys",
        nav="keys",
        columns=columns,
        all_columns=COLUMNS,
        fixed=FIXED_COLUMNS,
        rows=rows,
        error=error,
        first_page=marker is None,
        next_page=_keys_page(next_marker) if next_marker else None,
    )


def _keys_page(marker: str) -> str:
    return f"/console/keys?{urllib.parse.urlencode({'marker': marker})}"


def _row(meta: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    return {
        "aliases": ", ".join(sorted(a.removeprefix("alias/") for a in aliases)) or "-",
        "key_id": meta["KeyId"],
        "status": meta.get("KeyState", ""),
        "origin": ORIGIN_LABELS.get(meta.get("Origin", ""), meta.get("Origin", "")),
        "created_epoch": meta.get("CreationDate", 0.0),
        "description": meta.get("Description", ""),
        "store_id": meta.get("CustomKeyStoreId", ""),
        "cluster_id": meta.get("CloudHsmClusterId", ""),
        "key_spec": meta.get("KeySpec", ""),
        "key_usage": meta.get("KeyUsage", ""),
    }


def save_preferences(page: Page) -> Response:
    names = {c.name for c in COLUMNS}
    wanted = [n for n in page.request.fields("column") if n in names]
    value = ":".join(sorted(set(wanted) | FIXED_COLUMNS))
    response = redirect("/console/keys")
    response.set_cookie(
        PREFERENCES_COOKIE,
        value,
        secure=page.request.secure,
        max_age=PREFERENCES_MAX_AGE,
    )
    return response


def _section(page: Page, operation: str, params: dict[str, Any]) -> tuple[Any, ErrorText | None]:
    try:
        return page.run(operation, params), None
    except KmsError as exc:
        return None, ErrorText.of(exc)


def key_detail(
    page: Page,
    key_id: str,
    *,
    alias_error: ErrorText | None = None,
    action_error: ErrorText | None = None,
    policy_draft: str | None = None,
    status: int = 200,
) -> Response:
    try:
        meta = page.run("DescribeKey", {"KeyId": key_id})["KeyMetadata"]
    except KmsError as exc:
        return page.html(
            "error.html",
            status=404 if exc.code == "NotFoundException" else 400,
            title="Key",
            nav="keys",
            error=ErrorText.of(exc),
        )
    key_id = meta["KeyId"]
    policy, policy_error = _section(page, "GetKeyPolicy", {"KeyId": key_id})
    aliases, aliases_error = _section(page, "ListAliases", {"KeyId": key_id, "Limit": 100})
    tags, tags_error = _section(page, "ListResourceTags", {"KeyId": key_id, "Limit": 50})
    store_name, store_error = "", None
    if meta.get("CustomKeyStoreId"):
        stores, store_error = _section(
            page, "DescribeCustomKeyStores", {"CustomKeyStoreId": meta["CustomKeyStoreId"]}
        )
        if stores and stores.get("CustomKeyStores"):
            store_name = stores["CustomKeyStores"][0].get("CustomKeyStoreName", "")
    return page.html(
        "key.html",
        status=status,
        title=f"Key {key_id}",
        nav="keys",
        key=meta,
        origin_label=ORIGIN_LABELS.get(meta.get("Origin", ""), meta.get("Origin", "")),
        store_name=store_name,
        store_error=store_error,
        policy=policy["Policy"] if policy else "",
        policy_draft=policy_draft,
        policy_error=policy_error,
        aliases=(aliases or {}).get("Aliases", []),
        aliases_error=aliases_error,
        tags=(tags or {}).get("Tags", []),
        tags_error=tags_error,
        created=page.request.query.get("created") == "1",
        alias_error=alias_error,
        action_error=action_error,
        window_days=DEFAULT_WINDOW_DAYS,
        min_window=MIN_WINDOW_DAYS,
        max_window=MAX_WINDOW_DAYS,
    )


def key_action(page: Page, key_id: str, action: str) -> Response:
    request = page.request
    params: dict[str, Any] = {"KeyId": key_id}
    operation = {
        "enable": "EnableKey",
        "disable": "DisableKey",
        "schedule-deletion": "ScheduleKeyDeletion",
        "cancel-deletion": "CancelKeyDeletion",
        "policy": "PutKeyPolicy",
    }.get(action)
    draft: str | None = None
    if operation is None:
        return page.html(
            "error.html",
            status=404,
            title="Not found",
            nav="keys",
            error=ErrorText("NotFound", f"The console has no key action {action!r}."),
        )
    if operation == "ScheduleKeyDeletion":
        days = request.field("window")
        if not days.isdigit() or not MIN_WINDOW_DAYS <= int(days) <= MAX_WINDOW_DAYS:
            error = ErrorText(
                "ValidationException",
                f"The waiting period must be {MIN_WINDOW_DAYS} to {MAX_WINDOW_DAYS} days.",
            )
            return key_detail(page, key_id, action_error=error, status=400)
        params["PendingWindowInDays"] = int(days)
    if operation == "PutKeyPolicy":
        draft = request.field("policy")
        problem = check_policy_json(draft)
        if problem:
            error = ErrorText("MalformedPolicyDocumentException", problem)
            return key_detail(page, key_id, action_error=error, policy_draft=draft, status=400)
        params["Policy"] = draft
    try:
        page.run(operation, params)
    except KmsError as exc:
        return key_detail(
            page, key_id, action_error=ErrorText.of(exc), policy_draft=draft, status=400
        )
    return redirect(f"/console/keys/{urllib.parse.quote(key_id, safe='')}")
