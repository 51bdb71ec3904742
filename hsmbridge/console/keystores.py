"""The "Custom key stores" pages: the list, create, edit, connect, disconnect and delete.

Owns: `store_list` (DescribeCustomKeyStores as the caller: name, ID, cluster ID, connection
state, and for a FAILED store its ConnectionErrorCode with the troubleshooting text, plus the
cluster's ACTIVE HSMs from the inventory), `store_action` (ConnectCustomKeyStore,
DisconnectCustomKeyStore, DeleteCustomKeyStore) and `create_form` / `create_store`
(CreateCustomKeyStore: name, cluster ID, trust anchor certificate, kmsuser password), and
`edit_form` / `edit_store` (UpdateCustomKeyStore with the settings the form changed: name,
related cluster ID, new kmsuser password) and `delete_form`, the confirmation a deletion goes
through (the list links to it; only its button posts DeleteCustomKeyStore). The service's rules
and messages apply unchanged (the cluster and the password change only while the store is
disconnected); a KMS error is shown with the inputs kept (never the password).
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from typing import Any, Final

from hsmbridge.console.troubleshooting import troubleshooting
from hsmbridge.console.view import ErrorText, Page
from hsmbridge.console.web import Response, redirect
from hsmbridge.errors import KmsError

_ACTIONS: Final = {
    "connect": "ConnectCustomKeyStore",
    "disconnect": "DisconnectCustomKeyStore",
    "delete": "DeleteCustomKeyStore",
}


def store_list(page: Page, *, error: ErrorText | None = None, status: int = 200) -> Response:
    stores: list[dict[str, Any]] = []
    try:
        found = page.all_pages("DescribeCustomKeyStores", "CustomKeyStores", {"Limit": 100})
    except KmsError as exc:
        found, error, status = [], error or ErrorText.of(exc), 400
    for s in sorted(found, key=lambda s: (s.get("CustomKeyStoreName", ""), s["CustomKeyStoreId"])):
        code = s.get("ConnectionErrorCode")
        stores.append(
            {
                **s,
                "troubleshooting": troubleshooting(code),
                "cluster": page.directory.cluster(s.get("CloudHsmClusterId", "")),
            }
        )
    return page.html(
        "keystores.html",
        status=status,
        title="Custom key stores",
        nav="keystores",
        stores=stores,
        error=error,
        done=page.request.query.get("done", ""),
    )


def store_action(page: Page, store_id: str, action: str) -> Response:
    if action == "edit":
        return edit_store(page, store_id)
    operation = _ACTIONS.get(action)
    if operation is None:
        error = ErrorText("NotFound", f"The console has no key store action {action!r}.")
        return store_list(page, error=error, status=404)
    try:
        page.run(operation, {"CustomKeyStoreId": store_id})
    except KmsError as exc:
        if action == "delete":  # the refusal belongs on the confirmation that asked for it
            return delete_form(page, store_id, error=ErrorText.of(exc), status=400)
        return store_list(page, error=ErrorText.of(exc), status=400)
    return redirect(f"/console/keystores?done={action}")


def delete_form(
    page: Page, store_id: str, *, error: ErrorText | None = None, status: int = 200
) -> Response:
    try:
        store = _described(page, store_id)
    except KmsError as exc:
        return store_list(page, error=ErrorText.of(exc), status=400)
    return page.html(
        "keystore_delete.html",
        status=status,
        title=f"Delete {store['CustomKeyStoreName']}",
        nav="keystores",
        store=store,
        error=error,
    )


def create_form(
    page: Page,
    *,
    values: dict[str, str] | None = None,
    error: ErrorText | None = None,
    status: int = 200,
) -> Response:
    return page.html(
        "keystore_create.html",
        status=status,
        title="Create custom key store",
        nav="keystores",
        values=values or {"name": "", "cluster": "", "anchor": ""},
        error=error,
    )


def create_store(page: Page) -> Response:
    request = page.request
    values = {
        "name": request.field("name").strip(),
        "cluster": request.field("cluster").strip(),
        "anchor": request.field("anchor"),
    }
    params = {
        "CustomKeyStoreName": values["name"],
        "CloudHsmClusterId": values["cluster"],
        "TrustAnchorCertificate": values["anchor"],
        "KeyStorePassword": request.field("password"),
    }
    try:
        page.run("CreateCustomKeyStore", params)
    except KmsError as exc:
        return create_form(page, values=values, error=ErrorText.of(exc), status=400)
    return redirect("/console/keystores?done=create")


def _described(page: Page, store_id: str) -> dict[str, Any]:
    found = page.run("DescribeCustomKeyStores", {"CustomKeyStoreId": store_id})
    stores: list[dict[str, Any]] = found.get("CustomKeyStores", [])
    return stores[0]


def edit_form(
    page: Page,
    store_id: str,
    *,
    values: dict[str, str] | None = None,
    error: ErrorText | None = None,
    status: int = 200,
) -> Response:
    try:
        store = _described(page, store_id)
    except KmsError as exc:
        return store_list(page, error=ErrorText.of(exc), status=400)
    current = {"name": store["CustomKeyStoreName"], "cluster": store["CloudHsmClusterId"]}
    return page.html(
        "keystore_edit.html",
        status=status,
        title=f"Edit {current['name']}",
        nav="keystores",
        store=store,
        values=values or current,
        error=error,
    )


def edit_store(page: Page, store_id: str) -> Response:
    request = page.request
    values = {"name": request.field("name").strip(), "cluster": request.field("cluster").strip()}
    password = request.field("password")
    try:
        store = _described(page, store_id)
    except KmsError as exc:
        return store_list(page, error=ErrorText.of(exc), status=400)
    # Only what the form changed: KMS checks each setting it is given (a cluster ID, even the
    # current one, must be ACTIVE and related), and a blank password field means "unchanged".
    params: dict[str, str] = {"CustomKeyStoreId": store_id}
    if values["name"] != store["CustomKeyStoreName"]:
        params["NewCustomKeyStoreName"] = values["name"]
    if values["cluster"] != store["CloudHsmClusterId"]:
        params["CloudHsmClusterId"] = values["cluster"]
    if password:
        params["KeyStorePassword"] = password
    if len(params) == 1:
        error = ErrorText(
            "Nothing to change",
            "Change the name, the CloudHSM cluster ID or the kmsuser password, or cancel.",
        )
        return edit_form(page, store_id, values=values, error=error, status=400)
    try:
        page.run("UpdateCustomKeyStore", params)
    except KmsError as exc:
        return edit_form(page, store_id, values=values, error=ErrorText.of(exc), status=400)
    return redirect("/console/keystores?done=edit")
