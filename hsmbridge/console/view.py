"""What every console page handler gets: the signed-in caller, its operations, and rendering.

Owns: `Page` (one request of a signed-in principal: run an operation as it, render a template
with the page header's facts (account, principal, Region) and the session's CSRF token), and
`ErrorText`, a KMS error as the console shows it (exception name and message).
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hsmbridge.console.calls import Caller, Operations
from hsmbridge.console.directory import Directory
from hsmbridge.console.render import render
from hsmbridge.console.web import Request, Response
from hsmbridge.errors import KmsError


@dataclass(frozen=True, slots=True)
class ErrorText:
    code: str
    message: str

    @classmethod
    def of(cls, exc: KmsError) -> ErrorText:
        return cls(exc.code, exc.message)


@dataclass(frozen=True, slots=True)
class Page:
    request: Request
    caller: Caller
    csrf: str
    region: str
    partition: str
    ops: Operations
    directory: Directory

    def run(self, operation: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.ops.run(self.caller, operation, params or {})

    def all_pages(self, operation: str, key: str, params: Mapping[str, Any]) -> list[Any]:
        """Every item of a paginated list operation (one audited call per page)."""
        items: list[Any] = []
        request = dict(params)
        while True:
            page = self.run(operation, request)
            items.extend(page.get(key, []))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                return items
            request = {**params, "Marker": marker}

    def html(self, template: str, *, status: int = 200, **context: Any) -> Response:
        context.setdefault("nav", "")  # the navigation pane's current entry
        body = render(
            template,
            account=self.caller.account_id,
            principal=self.caller.principal_arn,
            region=self.region,
            csrf=self.csrf,
            **context,
        )
        return Response(status, body)
