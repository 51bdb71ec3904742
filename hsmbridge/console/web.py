"""Requests and responses of the console, on raw ASGI: what the pages read and write.

Owns: `Request` (method, path, query, form, cookies, client; built by `read_request`, which
refuses bodies over the limit and reads only `application/x-www-form-urlencoded` forms, parsed
with `urllib.parse`), `Response` (status, HTML or a redirect, cookies) and `send_response`, which
adds the security headers every console answer carries (no caching, no framing, a strict
Content-Security-Policy: the console runs no script and loads only its own stylesheet).
Must not import anything above `hsmbridge.request`.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FORM_TYPE: Final = "application/x-www-form-urlencoded"
_SECURITY_HEADERS: Final = [
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class BodyError(Exception):
    """The request body cannot be read: too large, too slow, or not a form."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    form: Mapping[str, list[str]]
    cookies: Mapping[str, str]
    headers: Mapping[str, str]
    source_ip: str | None
    secure: bool  # served over TLS

    def field(self, name: str, default: str = "") -> str:
        values = self.form.get(name)
        return values[0] if values else default

    def fields(self, name: str) -> list[str]:
        return list(self.form.get(name, ()))


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def set_cookie(
        self,
        name: str,
        value: str,
        *,
        secure: bool,
        max_age: int | None,
        http_only: bool = True,
    ) -> None:
        """A cookie for the console's path only, never sent cross-site (SameSite=Strict)."""
        parts = [f"{name}={value}", "Path=/console/", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if http_only:
            parts.append("HttpOnly")
        if secure:
            parts.append("Secure")
        self.headers.append((b"set-cookie", "; ".join(parts).encode("latin-1")))

    def clear_cookie(self, name: str, *, secure: bool) -> None:
        self.set_cookie(name, "", secure=secure, max_age=0)


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, b"", headers=[(b"location", location.encode("latin-1"))])


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


async def _body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BodyError("the client disconnected before sending the form")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyError(f"the form is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_request(
    scope: Scope, receive: Receive, *, max_bytes: int, timeout_s: float
) -> Request:
    """The request, its form read and parsed (POST only). Raises BodyError."""
    headers = _headers(scope)
    form: dict[str, list[str]] = {}
    if scope["method"] == "POST":
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != FORM_TYPE:
            raise BodyError(f"a console form must be sent as {FORM_TYPE}")
        try:
            async with asyncio.timeout(timeout_s):
                body = await _body(receive, max_bytes)
        except TimeoutError:
            raise BodyError("the form was not received in time") from None
        try:
            form = urllib.parse.parse_qs(
                body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
            )
        except UnicodeDecodeError:
            raise BodyError("the form is not UTF-8") from None
    query = {
        k: v[0]
        for k, v in urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
    }
    client = scope.get("client")
    return Request(
        method=scope["method"],
        path=scope["path"],
        query=query,
        form=form,
        cookies=_cookies(headers.get("cookie", "")),
        headers=headers,
        source_ip=client[0] if client else None,
        secure=scope.get("scheme") == "https",
    )


async def send_response(send: Send, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode("ascii")),
        *_SECURITY_HEADERS,
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})
