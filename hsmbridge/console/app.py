"""The console's ASGI sub-app, mounted by the HTTP edge at `/console/` on the KMS API's port.

Owns: `ConsoleApp`: reading the request (`web`), then in a worker thread (pages run blocking KMS
operations) sign-in and sign-out, the session check (a signed cookie naming an access key that
the credentials file still maps to the same principal), the CSRF check of every POST (403
otherwise, before anything runs), routing to the pages, and the last guard: an unexpected
exception is logged with its traceback and shown as KMSInternalException with the API's generic
message, never a traceback.

Sign-in compares the access key pair with the credentials file the SigV4 verifier uses, in
constant time (an unknown key id still costs a comparison), answers a failure without saying
which half was wrong, and writes a `ConsoleLogin` audit event either way.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from hsmbridge.console import create_key, keystores, pages
from hsmbridge.console.calls import Caller, Operations
from hsmbridge.console.directory import Directory
from hsmbridge.console.render import STYLESHEET, render
from hsmbridge.console.session import (
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionCodec,
    new_presession_nonce,
)
from hsmbridge.console.signin_throttle import SignInThrottle
from hsmbridge.console.view import ErrorText, Page
from hsmbridge.console.web import (
    BodyError,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    read_request,
    redirect,
    send_response,
)
from hsmbridge.errors import KmsError
from hsmbridge.identity.credentials import Credential
from hsmbridge.protocol.errors import GENERIC_INTERNAL_MESSAGE
from hsmbridge.trail.calls import ApiEvent, api_event
from hsmbridge.trail.context import RequestScope

logger = logging.getLogger(__name__)

PREFIX: Final = "/console/"
CONSOLE_THREADS: Final = 8
SIGNIN_EVENT_SOURCE: Final = "signin.amazonaws.com"
_FAILED_SIGNIN: Final = "The access key ID or the secret access key is not correct."
_AKID_RE: Final = re.compile(r"^[A-Z0-9]{16,128}$")
_KEY_PATH: Final = re.compile(r"^/console/keys/([^/]+)$")
_KEY_ACTION_PATH: Final = re.compile(r"^/console/keys/([^/]+)/([a-z-]+)$")
_STORE_ACTION_PATH: Final = re.compile(r"^/console/keystores/([^/]+)/([a-z-]+)$")
_STORE_FORM_PATH: Final = re.compile(r"^/console/keystores/([^/]+)/(edit|delete)$")
# Compared against when the access key id is unknown, so both cases cost one comparison.
_NO_SUCH_KEY_SECRET: Final = secrets.token_urlsafe(30)
PageHandler = Callable[[Page], Response]
_GET_PAGES: Final[Mapping[str, PageHandler]] = {
    "/console/keys": pages.key_list,
    "/console/keys/create": create_key.show_start,
    "/console/keystores": keystores.store_list,
    "/console/keystores/create": keystores.create_form,
}
_POST_FORMS: Final[Mapping[str, PageHandler]] = {
    "/console/keys/preferences": pages.save_preferences,
    "/console/keys/create": create_key.submit,
    "/console/keystores/create": keystores.create_store,
}


class ConsoleApp:
    """The ASGI callable for paths under `/console/`. Build it with `console.compose`."""

    def __init__(
        self,
        *,
        operations: Operations,
        directory: Directory,
        credentials: Mapping[str, Credential],
        codec: SessionCodec,
        region: str,
        partition: str,
        on_event: Callable[[ApiEvent], None] | None,
        max_request_bytes: int,
        body_timeout_s: float,
        threads: int = CONSOLE_THREADS,
        throttle: SignInThrottle | None = None,
    ) -> None:
        self._ops = operations
        self._throttle = throttle or SignInThrottle()
        self._directory = directory
        self._credentials = dict(credentials)
        self._codec = codec
        self._region = region
        self._partition = partition
        self._on_event = on_event
        self._max_bytes = max_request_bytes
        self._body_timeout = body_timeout_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="hsmbridge-console")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = await read_request(
                scope, receive, max_bytes=self._max_bytes, timeout_s=self._body_timeout
            )
        except BodyError as exc:
            body = render("plain_error.html", title="Bad request", message=str(exc))
            await send_response(send, Response(400, body))
            return
        run = contextvars.copy_context().run
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self._pool, run, self._handle, request)
        await send_response(send, response)

    # --- the request, in a worker thread -------------------------------------------------------

    def _handle(self, request: Request) -> Response:
        try:
            return self._route(request)
        except KmsError as exc:  # e.g. the metadata database (sign-outs) did not answer in time
            logger.warning("console request %s %s failed: %s", request.method, request.path, exc)
            body = render("plain_error.html", title="Error", message=str(exc))
            return Response(503 if exc.fault else 400, body)
        except Exception:
            logger.exception("console request %s %s failed", request.method, request.path)
            body = render(
                "plain_error.html",
                title="Error",
                message=f"KMSInternalException: {GENERIC_INTERNAL_MESSAGE}",
            )
            return Response(500, body)

    def _route(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == "/console":
            return redirect(PREFIX, 308)
        if path == "/console/static/console.css" and method == "GET":
            return Response(200, STYLESHEET, "text/css; charset=utf-8")
        if path == "/console/signin":
            return self._signin_form(request) if method == "GET" else self._signin(request)
        return self._signed_in(request)

    def _signed_in(self, request: Request) -> Response:
        """Every other page: a valid session first, then for a POST its CSRF token."""
        session, caller = self._session(request)
        if session is None or caller is None:
            return redirect("/console/signin")
        page = Page(
            request,
            caller,
            self._codec.csrf_token(session.nonce),
            self._region,
            self._partition,
            self._ops,
            self._directory,
        )
        if request.method == "GET":
            return self._get(page)
        if request.method != "POST":
            return Response(405, b"", headers=[(b"allow", b"GET, POST")])
        if not self._codec.csrf_ok(session.nonce, request.field("csrf") or None):
            error = ErrorText(
                "Forbidden",
                "The form's security token is missing or wrong (CSRF protection). Nothing was "
                "changed; reload the page and try again.",
            )
            return page.html("error.html", status=403, title="Forbidden", nav="", error=error)
        if request.path == "/console/signout":
            return self._signout(page, session)
        return self._post(page)

    def _get(self, page: Page) -> Response:
        path = page.request.path
        if path == PREFIX:
            return redirect("/console/keys")
        handler = _GET_PAGES.get(path)
        if handler is not None:
            return handler(page)
        match = _KEY_PATH.match(path)
        if match:
            return pages.key_detail(page, match[1])
        match = _STORE_FORM_PATH.match(path)
        if match:
            form = keystores.edit_form if match[2] == "edit" else keystores.delete_form
            return form(page, match[1])
        return self._not_found(page)

    def _post(self, page: Page) -> Response:
        path = page.request.path
        handler = _POST_FORMS.get(path)
        if handler is not None:
            return handler(page)
        match = _KEY_ACTION_PATH.match(path)
        if match:
            return pages.key_action(page, match[1], match[2])
        match = _STORE_ACTION_PATH.match(path)
        if match:
            return keystores.store_action(page, match[1], match[2])
        return self._not_found(page)

    def _signout(self, page: Page, session: Session) -> Response:
        self._codec.revoke(session)
        response = redirect("/console/signin")
        response.clear_cookie(SESSION_COOKIE, secure=page.request.secure)
        return response

    @staticmethod
    def _not_found(page: Page) -> Response:
        return page.html(
            "error.html",
            status=404,
            title="Not found",
            nav="",
            error=ErrorText("NotFound", f"The console has no page {page.request.path}."),
        )

    # --- sessions -------------------------------------------------------------------------------

    def _session(self, request: Request) -> tuple[Session | None, Caller | None]:
        session = self._codec.verify(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None, None
        credential = self._credentials.get(session.access_key_id)
        if credential is None or credential.principal.arn != session.principal_arn:
            return None, None  # the key was removed or now belongs to someone else
        return session, self._caller(request, credential)

    @staticmethod
    def _caller(request: Request, credential: Credential) -> Caller:
        principal = credential.principal
        return Caller(
            principal.access_key_id,
            principal.arn,
            principal.account_id,
            principal.via_service,
            request.source_ip,
            request.headers.get("user-agent"),
            request.secure,
        )

    def _signin_form(
        self,
        request: Request,
        *,
        error: str | None = None,
        access_key_id: str = "",
        status: int = 200,
    ) -> Response:
        nonce = request.cookies.get(PRESESSION_COOKIE) or new_presession_nonce()
        body = render(
            "signin.html",
            title="Sign in",
            region=self._region,
            csrf=self._codec.csrf_token(nonce),
            error=error,
            access_key_id=access_key_id,
        )
        response = Response(status, body)
        if request.cookies.get(PRESESSION_COOKIE) != nonce:
            response.set_cookie(PRESESSION_COOKIE, nonce, secure=request.secure, max_age=3600)
        return response

    def _signin(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(405, b"", headers=[(b"allow", b"GET, POST")])
        akid = request.field("access_key_id").strip()
        secret = request.field("secret_access_key")
        nonce = request.cookies.get(PRESESSION_COOKIE)
        if not self._codec.csrf_ok(nonce, request.field("csrf") or None):
            message = "The sign-in form expired or was not sent by this console; try again."
            return self._signin_form(request, error=message, access_key_id=akid, status=403)
        wait = self._throttle.retry_after(request.source_ip or "unknown", akid)
        if wait > 0:
            # Refused before the secret is compared: a guess made now learns nothing.
            self._signin_event(request, akid, None, 429, "Too many failed sign-ins")
            message = (
                "Too many failed sign-ins from this address or for this access key ID. "
                f"Try again in {math.ceil(wait)} seconds."
            )
            response = self._signin_form(request, error=message, access_key_id=akid, status=429)
            response.headers.append((b"retry-after", str(math.ceil(wait)).encode()))
            return response
        credential = self._credentials.get(akid)
        expected = credential.secret if credential is not None else _NO_SUCH_KEY_SECRET
        matches = hmac.compare_digest(secret.encode("utf-8"), expected.encode("utf-8"))
        if credential is None or not matches:
            self._throttle.failed(request.source_ip or "unknown", akid)
            self._signin_event(request, akid, None, 401, "Failed authentication")
            return self._signin_form(request, error=_FAILED_SIGNIN, access_key_id=akid, status=401)
        _, cookie = self._codec.issue(akid, credential.principal.arn)
        self._signin_event(request, akid, credential.principal.arn, 200, None)
        response = redirect("/console/keys")
        response.set_cookie(
            SESSION_COOKIE,
            cookie,
            secure=request.secure,
            max_age=int(self._codec.lifetime_s),
        )
        response.clear_cookie(PRESESSION_COOKIE, secure=request.secure)
        return response

    def _signin_event(
        self,
        request: Request,
        akid: str,
        principal_arn: str | None,
        status: int,
        error_code: str | None,
    ) -> None:
        if self._on_event is None:
            return
        scope = RequestScope(str(uuid.uuid4()), "ConsoleLogin")
        scope.additional["eventSource"] = SIGNIN_EVENT_SOURCE
        started = time.perf_counter()
        event = api_event(
            scope,
            operation="ConsoleLogin",
            principal_arn=principal_arn,
            source_ip=request.source_ip,
            status=status,
            error_code=error_code,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            # Only something shaped like an access key id: never a pasted secret.
            params_redacted={"accessKeyId": akid} if _AKID_RE.match(akid) else {},
        )
        try:
            self._on_event(event)
        except Exception:
            logger.exception("audit hook failed for a console sign-in")
