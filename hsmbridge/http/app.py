"""The HTTP edge: a raw ASGI application speaking the KMS awsJson 1.1 protocol, and STS's Query
protocol and the CloudHSM v2 API (awsJson 1.1 and Smithy RPC v2 CBOR) on the same endpoint.

Owns: `create_asgi_app` and the request pipeline (route -> SigV4 header checks -> body limit and
deadline -> SigV4 signature -> JSON -> implemented? -> model validation -> handler in a worker
thread, under the request's deadline -> JSON), with one outermost guard that turns every failure
into a KMS error response via `protocol.errors`. A request is authenticated before its body is
parsed, so nothing of an unauthenticated body is ever parsed or recorded. Handlers of operations
that may reach an HSM run in one thread pool, all others in another, so metadata never queues
behind a slow HSM; at most MAX_IN_FLIGHT requests are served at once (beyond: ThrottlingException).
`GET /health` and `GET /metrics` optionally require a bearer token. A POST whose Content-Type
is `application/x-www-form-urlencoded` is an STS call: the same pipeline with a form body, SigV4 for
service `sts`, the STS operation table and XML answers and errors from `protocol.sts`. A POST to `/`
whose `X-Amz-Target` starts with `BaldrApiService.`, or any POST to `/service/...` (RPC v2 CBOR), is
a CloudHSM v2 call: the same pipeline with SigV4 for service `cloudhsm`, the cloudhsmv2 model,
`protocol.cloudhsm`'s table and its JSON or CBOR answers and errors, and `eventSource`
cloudhsm.amazonaws.com. Paths under `/console/` (GET and POST) go to the web console's sub-app
when one is mounted (`console`, built by the composition root; it authenticates and audits on
its own), and are unknown routes otherwise. Each request runs inside a
`trail.context.RequestScope` (copied into the worker thread) so the service can name the key and
store it touched and the backend wrapper can add HSM latency; `ApiEvent` carries those facts to
the one audit event per request.
Must not import: pkcs11 or backend internals. Handlers arrive as a table from the composition
root, so this module does not import the service layer either. Only `hsmbridge.http` may import
uvicorn, and this module does not need it (`http.server` runs it).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

from hsmbridge import deadline, nowait
from hsmbridge.errors import (
    DependencyTimeoutException,
    IncompleteSignatureException,
    SerializationException,
    ThrottlingException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmbridge.http.sigv4 import SERVICE, PendingSignature, SigV4Verifier
from hsmbridge.identity.sessions import Caller
from hsmbridge.protocol import cloudhsm
from hsmbridge.protocol.cloudhsm import CloudHsmEndpoint
from hsmbridge.protocol.errors import CONTENT_TYPE, encode_json, error_response, json_headers
from hsmbridge.protocol.operations import Handler
from hsmbridge.protocol.sts import (
    EVENT_SOURCE,
    FORM_CONTENT_TYPE,
    SIGNING_SERVICE,
    StsHandler,
    action_of,
    encode_result,
    parse_form,
    redact_sts_params,
    sts_error_response,
    xml_headers,
)
from hsmbridge.protocol.validation import operation_names, redact_params, validate_input
from hsmbridge.request import RequestContext
from hsmbridge.trail.calls import ApiEvent, api_event
from hsmbridge.trail.context import RequestScope, annotate_store, request_scope

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TARGET_PREFIX: Final = "TrentService."
MAX_JSON_DEPTH: Final = 20  # KMS inputs nest at most 3 deep; the margin is for future shapes
# A client must deliver its whole body this long after the headers. uvicorn's keep-alive timeout
# only runs between requests, and h11 has no body timeout, so a client trickling a body would
# otherwise hold a connection (and count against limit_concurrency) for as long as it likes.
BODY_TIMEOUT_S: Final = 10.0
_CLOSE: Final = (b"connection", b"close")
LIGHT_THREADS: Final = 8  # operations that never reach an HSM: metadata reads and writes, STS
MAX_IN_FLIGHT: Final = 1024  # requests being served at once; beyond it ThrottlingException
# Open connections from one client address; SDK pools use ~10, load generators ~64-128. Behind a
# proxy every client shares its address: set `[service] max_connections_per_client = 0` there.
MAX_CONNECTIONS_PER_CLIENT: Final = 256
_OPS_UNAUTHORIZED: Final = [
    (b"content-type", b"text/plain"),
    (b"www-authenticate", b'Bearer realm="hsmbridge"'),
]
_SURROGATE_RE: Final = re.compile(r"[\ud800-\udfff]")


class SubApp(Protocol):
    """An ASGI app mounted under a path prefix (the web console), closed with the API."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Trace:
    """What the pipeline learned before it finished or failed; feeds the ApiEvent."""

    operation: str | None = None
    principal: Caller | None = None
    params: Any = None
    source_ip: str | None = None
    sts: bool = False  # an STS (Query protocol) call
    cloudhsm: str | None = None  # a CloudHSM v2 call: "json" or "cbor"
    close: bool = False  # answer with Connection: close (the client is misbehaving)
    # Where the handler ran: "inline" (on the event loop), "rerun" (an inline attempt refused,
    # then a worker thread), "thread"; None: no handler ran.
    ran: str | None = None
    body_handled: bool = False  # _read_body took charge of the request body


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-case names (uvicorn already lowers them); repeats joined with "," as SigV4 expects.

    Raises IncompleteSignatureException for a repeated Authorization header: joined, a valid
    signature in either copy would otherwise authenticate the whole request."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in out and name == "authorization":
            raise IncompleteSignatureException("The request must carry one Authorization header.")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def _reject_constant(name: str) -> Any:
    raise SerializationException(f"'{name}' is not valid JSON")


def _check_depth(obj: Any) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise SerializationException(f"JSON nesting exceeds {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _check_surrogates(obj: Any) -> None:
    # json.loads turns an escaped pair (`\ud83d\ude00`) into one code point, so any surrogate
    # left in a string is unpaired: not Unicode text, and AWS's JSON parser refuses it.
    stack: list[Any] = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE_RE.search(node):
                raise SerializationException(
                    "Request body is not valid JSON: a string holds an unpaired UTF-16 surrogate"
                )
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_json(body: bytes) -> Any:
    """The request document; an empty body means no parameters (NOTE: KMS may reject it).

    The body must be UTF-8 (json.loads would also guess UTF-16 and UTF-32 from bytes) and its
    strings Unicode text (no unpaired surrogate escapes); otherwise SerializationException."""
    if not body:
        return {}
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise SerializationException("Request body is not valid JSON") from None
    # Cheap pre-check: a document with few brackets cannot be deep, so skip the walk.
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH:
        _check_depth(obj)
    if b"\\u" in body:  # a surrogate can only come from a \u escape (UTF-8 cannot encode one)
        _check_surrogates(obj)
    return obj


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KmsApi:
    """The ASGI callable. Build it with `create_asgi_app`; wire dependencies in, never globals."""

    def __init__(
        self,
        *,
        operations: Mapping[str, Handler],
        verifier: SigV4Verifier | None,
        max_request_bytes: int,
        sts_operations: Mapping[str, StsHandler] | None,
        cloudhsm_endpoint: CloudHsmEndpoint | None,
        health: Callable[[], tuple[int, dict[str, Any]]] | None,
        metrics: Callable[[], tuple[bytes, str]] | None,
        on_event: Callable[[ApiEvent], None] | None,
        worker_threads: int,
        handler_timeout_s: float | None,
        body_timeout_s: float,
        anonymous_account: str,
        hsm_operations: frozenset[str] = frozenset(),
        inline_operations: frozenset[str] = frozenset(),
        light_threads: int = LIGHT_THREADS,
        max_in_flight: int = MAX_IN_FLIGHT,
        ops_token: str | None = None,
        max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
        console: SubApp | None = None,
    ) -> None:
        known = operation_names()
        unknown = sorted(set(operations) - known)
        if unknown:  # a typo in the table would otherwise surface as UnknownOperation at runtime
            raise ValueError(f"not KMS operations: {', '.join(unknown)}")
        self._operations = dict(operations)
        # None: no STS on this endpoint (form posts are then unknown KMS operations, as before).
        self._sts = dict(sts_operations) if sts_operations is not None else None
        # None: no CloudHSM v2 API here (its requests are then unknown KMS operations).
        self._cloudhsm = cloudhsm_endpoint
        self._verifier = verifier
        self._max_bytes = max_request_bytes
        self._health = health
        self._metrics = metrics
        self._on_event = on_event
        self._timeout = handler_timeout_s
        self._body_timeout = body_timeout_s
        # Without a verifier (tests, embedding) every request acts as this account's root.
        self._anonymous_account = anonymous_account
        self._anonymous_arn = f"arn:aws:iam::{anonymous_account}:root" if anonymous_account else ""
        # Two pools, so metadata never waits for an HSM: operations that may reach an HSM run in
        # `_pool` (bounded: at most this many in flight, the rest queue; each store's bulkhead
        # caps its share), everything else (metadata, STS, the CloudHSM API) in `_light`.
        self._pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="hsmbridge-hsm")
        self._light = ThreadPoolExecutor(light_threads, thread_name_prefix="hsmbridge-op")
        self._hsm_operations = hsm_operations
        # Tried on the event loop first (`hsmbridge.nowait`): no thread hand-off when nothing
        # would make them wait, else rerun in `_pool`.
        self._inline_operations = inline_operations & hsm_operations
        # Requests being served (headers in, answer not yet sent). Idle and half-open connections
        # do not count: only requests take a slot, so holding sockets open costs an attacker a
        # socket each and denies nobody service.
        self._in_flight = 0
        self._max_in_flight = max_in_flight
        self._ops_token = ops_token.encode() if ops_token is not None else None
        # Read by the HTTP protocol (`http.server`) when a connection opens; 0: no cap.
        self.max_connections_per_client = max_connections_per_client
        # Run at lifespan shutdown instead of close() (in-flight requests are done by then).
        # Worker processes set it to their runtime's close: uvicorn ends them with their signal.
        self.on_shutdown: Callable[[], None] | None = None
        self._console = console

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._light.shutdown(wait=True, cancel_futures=False)
        if self._console is not None:
            self._console.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] != "http":
            return  # websockets are not part of the KMS protocol; uvicorn closes them
        elif self._console is not None and (
            scope["path"] == "/console" or scope["path"].startswith("/console/")
        ):
            await self._console(scope, receive, send)
        elif scope["method"] == "POST" and (
            scope["path"] == "/"
            or (self._cloudhsm is not None and scope["path"].startswith(cloudhsm.CBOR_PATH_PREFIX))
        ):
            await self._post(scope, receive, send)
        elif scope["method"] == "GET" and scope["path"] in {"/health", "/metrics"}:
            if self._ops_token is not None and not self._ops_authorized(scope):
                await _respond(send, 401, _OPS_UNAUTHORIZED, b"missing or wrong bearer token\n")
                return
            await self._ops_endpoint(scope["path"], send)
        else:
            request_id = str(uuid.uuid4())
            exc = UnknownOperationException(f"No route for {scope['method']} {scope['path']}")
            status, headers, body, _ = error_response(exc, request_id)
            await _respond(send, status, headers, body)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # In-flight handlers have finished (uvicorn waits for them); join the threads.
                cleanup = self.on_shutdown or self.close
                await asyncio.get_running_loop().run_in_executor(None, cleanup)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _ops_authorized(self, scope: Scope) -> bool:
        assert self._ops_token is not None
        expected = b"Bearer " + self._ops_token
        given = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(bytes(given[0]), expected)

    async def _ops_endpoint(self, path: str, send: Send) -> None:
        # Both hooks may block (a health check pings HSMs; a scrape reads locks and the DB), so
        # they run in the default executor: never on the event loop, never queued behind KMS calls.
        loop = asyncio.get_running_loop()
        if path == "/metrics" and self._metrics is not None:
            body, content_type = await loop.run_in_executor(None, self._metrics)
            headers = [(b"content-type", content_type.encode())]
            await _respond(send, 200, headers, body)
            return
        if path == "/metrics":
            await _respond(send, 404, [(b"content-type", b"text/plain")], b"metrics disabled\n")
            return
        if self._health is None:
            status, doc = 200, {"status": "ok"}
        else:
            status, doc = await loop.run_in_executor(None, self._health)
        body = json.dumps(doc).encode()
        await _respond(send, status, [(b"content-type", b"application/json")], body)

    def _is_sts(self, scope: Scope) -> bool:
        if self._sts is None:
            return False
        for name, value in scope["headers"]:
            if name.lower() == b"content-type":
                media: str = value.decode("latin-1").partition(";")[0].strip().lower()
                return media == FORM_CONTENT_TYPE
        return False

    def _cloudhsm_protocol(self, scope: Scope) -> str | None:
        """ "cbor" for an RPC v2 path, "json" for a BaldrApiService target, else None."""
        if self._cloudhsm is None:
            return None
        if scope["path"] != "/":
            return "cbor"  # the only other path __call__ posts here
        prefix = cloudhsm.TARGET_PREFIX.encode()
        for name, value in scope["headers"]:
            if name.lower() == b"x-amz-target":
                return "json" if bytes(value).startswith(prefix) else None
        return None

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        client = scope.get("client")
        trace = _Trace(source_ip=client[0] if client else None)
        trace.cloudhsm = self._cloudhsm_protocol(scope)
        trace.sts = trace.cloudhsm is None and self._is_sts(scope)
        error_code: str | None = None
        with request_scope(RequestScope(request_id)) as annotations:
            if trace.sts:
                annotations.additional["eventSource"] = EVENT_SOURCE
            elif trace.cloudhsm:
                annotations.additional["eventSource"] = cloudhsm.EVENT_SOURCE
            self._in_flight += 1
            try:
                if self._in_flight > self._max_in_flight:
                    raise ThrottlingException(
                        "The server is handling as many requests as it accepts; retry the request."
                    )
                if trace.sts:
                    body = await self._sts_pipeline(scope, receive, annotations, trace)
                    status, headers = 200, xml_headers(request_id, len(body))
                elif trace.cloudhsm:
                    body = await self._cloudhsm_pipeline(scope, receive, annotations, trace)
                    status, headers = 200, self._cloudhsm_headers(trace, request_id, len(body))
                else:
                    body = await self._pipeline(scope, receive, annotations, trace)
                    status, headers = 200, json_headers(request_id, len(body))
            except Exception as exc:  # the outermost guard; it logs non-hsmbridge errors
                status, headers, body, error_code = self._error_response(trace, exc, request_id)
                await self._discard_unread_body(receive, trace)
            finally:
                self._in_flight -= 1
            if trace.close:
                headers.append(_CLOSE)
            await _respond(send, status, headers, body)
            if self._on_event is not None:
                duration_ms = (time.perf_counter() - started) * 1000.0
                self._emit(annotations, trace, status, error_code, duration_ms)

    @staticmethod
    def _cloudhsm_headers(trace: _Trace, request_id: str, length: int) -> list[tuple[bytes, bytes]]:
        if trace.cloudhsm == "cbor":
            return cloudhsm.cbor_headers(request_id, length)
        return json_headers(request_id, length)

    @staticmethod
    def _error_response(
        trace: _Trace, exc: Exception, request_id: str
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, str]:
        """The error answer in the request's own protocol."""
        if trace.sts:
            return sts_error_response(exc, request_id)
        if trace.cloudhsm == "cbor":
            return cloudhsm.cbor_error_response(exc, request_id)
        if trace.cloudhsm == "json":
            return cloudhsm.json_error_response(exc, request_id)
        return error_response(exc, request_id)

    async def _pipeline(
        self, scope: Scope, receive: Receive, annotations: RequestScope, trace: _Trace
    ) -> bytes:
        request_id = annotations.request_id
        headers = _headers(scope)
        trace.operation = annotations.operation = operation = self._route(headers)
        pending = self._precheck(headers, SERVICE)
        body = await self._read_body(receive, headers, trace)
        self._authenticate(pending, scope, headers, body, trace)
        params = trace.params = parse_json(body)
        if operation not in self._operations:
            # A real KMS operation (the audit event names it), refused only once the request is
            # known to be signed: an unsigned one gets the signature error, as from KMS.
            raise UnsupportedOperationException(
                f"{operation} is not supported by this KMS endpoint (hsmbridge)"
            )
        typed = validate_input(operation, params)
        context = self._context(
            scope, headers, trace, request_id, tuple(typed.get("GrantTokens") or ())
        )
        handler = self._operations[operation]
        if operation in self._inline_operations:
            result = await self._call_inline(handler, context, typed, trace)
        else:
            pool = self._pool if operation in self._hsm_operations else self._light
            trace.ran = "thread"
            result = await self._call(handler, context, typed, pool)
        created_store = result.get("CustomKeyStoreId")  # CreateCustomKeyStore names it only here
        if isinstance(created_store, str):
            annotate_store(created_store)
        return encode_json(result)

    def _context(
        self,
        scope: Scope,
        headers: Mapping[str, str],
        trace: _Trace,
        request_id: str,
        grant_tokens: tuple[str, ...] = (),
    ) -> RequestContext:
        caller = trace.principal
        return RequestContext(
            principal_arn=caller.arn if caller else self._anonymous_arn,
            account_id=caller.account_id if caller else self._anonymous_account,
            request_id=request_id,
            source_ip=trace.source_ip,
            user_agent=headers.get("user-agent"),
            via_service=caller.via_service if caller else None,
            grant_tokens=grant_tokens,
            session_policy=caller.session_policy if caller else None,
            role_arn=caller.role_arn if caller else None,
            secure_transport=scope.get("scheme") == "https",
        )

    def _anonymous_caller(self) -> Caller:
        # Without a verifier (tests, embedding): the anonymous account's root, as for KMS calls.
        return Caller("", self._anonymous_account, self._anonymous_arn)

    async def _sts_pipeline(
        self, scope: Scope, receive: Receive, annotations: RequestScope, trace: _Trace
    ) -> bytes:
        assert self._sts is not None
        headers = _headers(scope)
        pending = self._precheck(headers, SIGNING_SERVICE)
        body = await self._read_body(receive, headers, trace)
        self._authenticate(pending, scope, headers, body, trace)
        params = trace.params = parse_form(body)
        if params.get("Action"):
            trace.operation = annotations.operation = params["Action"]  # named even if unknown
        action = action_of(params, self._sts)
        caller = trace.principal or self._anonymous_caller()
        context = self._context(scope, headers, trace, annotations.request_id)
        handler = self._sts[action]
        result = await self._call_sts(handler, caller, context, params)
        return encode_result(action, result, annotations.request_id)

    async def _cloudhsm_pipeline(
        self, scope: Scope, receive: Receive, annotations: RequestScope, trace: _Trace
    ) -> bytes:
        assert self._cloudhsm is not None
        cbor = trace.cloudhsm == "cbor"
        headers = _headers(scope)
        if cbor:
            operation = cloudhsm.cbor_operation(scope["path"])
        else:
            cloudhsm.check_json_headers(headers)
            operation = cloudhsm.json_operation(headers.get("x-amz-target", ""))
        trace.operation = annotations.operation = operation
        handler = self._cloudhsm.handler(operation)  # not served here: refused before the body
        pending = self._precheck(headers, cloudhsm.SIGNING_SERVICE)
        body = await self._read_body(receive, headers, trace)
        if cbor:
            cloudhsm.check_cbor_headers(headers, body)
        self._authenticate(pending, scope, headers, body, trace)
        params = trace.params = cloudhsm.parse_cbor(body) if cbor else parse_json(body)
        typed = cloudhsm.validate(operation, params)
        context = self._context(scope, headers, trace, annotations.request_id)
        result = await self._call(handler, context, typed, self._light)
        return cloudhsm.encode_cbor(result) if cbor else cloudhsm.encode_json_result(result)

    def _precheck(self, headers: Mapping[str, str], service: str) -> PendingSignature | None:
        """Everything SigV4 can check before the body arrives: a request without a valid
        Authorization header, date or scope, or from an unknown key, is refused before its body
        is read, parsed or recorded (an anonymous flood costs no JSON parsing and no audit
        parameters)."""
        if self._verifier is None:
            return None
        return self._verifier.precheck(headers, service=service)

    def _authenticate(
        self,
        pending: PendingSignature | None,
        scope: Scope,
        headers: Mapping[str, str],
        body: bytes,
        trace: _Trace,
    ) -> None:
        """The signature over the body; only then is the body parsed and its parameters kept."""
        if self._verifier is None or pending is None:
            return
        query = scope["query_string"].decode("latin-1")
        trace.principal = self._verifier.finish(
            pending, method="POST", path=scope["path"], query=query, headers=headers, body=body
        )

    async def _call_sts(
        self, handler: StsHandler, caller: Caller, context: RequestContext, params: dict[str, str]
    ) -> Any:
        # STS calls read IAM files, never an HSM: no deadline, but off the event loop all the same.
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(
            self._light, run, handler, caller, context, params
        )

    def _route(self, headers: Mapping[str, str]) -> str:
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != CONTENT_TYPE:
            # AWS's front end picks the protocol by Content-Type; with no match it cannot find an
            # operation and answers UnknownOperationException (seen in SDK issue reports).
            raise UnknownOperationException(f"Content-Type must be {CONTENT_TYPE}")
        target = headers.get("x-amz-target", "")
        service, dot, operation = target.partition(".")
        if not dot or service + dot != TARGET_PREFIX or operation not in operation_names():
            raise UnknownOperationException(f"Unknown operation {target!r}")
        return operation

    def _too_large(self) -> ValidationException:
        # NOTE: differs from KMS, whose front end answers oversize bodies before the service
        # sees them (a 413 with no KMS error body). A KMS-style 400 ValidationException keeps
        # boto3's error parsing working and is not retried.
        return ValidationException(
            f"Request body is too large: the limit is {self._max_bytes} bytes"
        )

    async def _discard_unread_body(self, receive: Receive, trace: _Trace) -> None:
        """A request refused before its body was read (an unsigned one is refused from its
        headers): read the rest and drop it unparsed, so that a client still sending gets the
        answer, not a connection reset (closing a socket with unread data resets it). Within the
        body limit and timeout; past either the connection is closed instead."""
        if trace.body_handled or trace.close:
            return
        size = 0
        try:
            async with asyncio.timeout(self._body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    size += len(message.get("body", b""))
                    if size > self._max_bytes:
                        trace.close = True
                        return
                    if not message.get("more_body", False):
                        return
        except TimeoutError:
            trace.close = True

    async def _read_body(
        self, receive: Receive, headers: Mapping[str, str], trace: _Trace
    ) -> bytes:
        trace.body_handled = True
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large()  # early: uvicorn discards the unread body itself
        try:
            # One deadline for the whole body (one timer, not one per chunk).
            async with asyncio.timeout(self._body_timeout):
                return await self._receive_body(receive)
        except TimeoutError:
            trace.close = True  # the rest of the body may still trickle in; drop the connection
            raise SerializationException(
                f"The request body was not received within {self._body_timeout:g} seconds"
            ) from None

    async def _receive_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise SerializationException("Client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:  # chunked or lying Content-Length
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _call(
        self,
        handler: Handler,
        context: RequestContext,
        params: dict[str, Any],
        pool: ThreadPoolExecutor,
    ) -> dict[str, Any]:
        # The worker runs in a copy of this task's context, so the request scope (and with it
        # the request id on log records) follows the call into the thread; O(1) to copy. So
        # does the deadline: the backend refuses to start HSM work for a request that has
        # waited past it (in the pool's queue, for a session or the library lock).
        deadline.start(self._timeout)
        return await self._in_thread(contextvars.copy_context(), handler, context, params, pool)

    async def _call_inline(
        self, handler: Handler, context: RequestContext, params: dict[str, Any], trace: _Trace
    ) -> dict[str, Any]:
        """The handler on the event loop, unless something on its way would wait: then again
        from the start on an HSM worker thread, in the same context (the deadline counts from
        the first attempt, and the rerun knows what the attempt already counted)."""
        deadline.start(self._timeout)
        ctx = contextvars.copy_context()
        trace.ran = "inline"  # also when the handler answers with a KMS error
        try:
            return ctx.run(nowait.attempt, handler, context, params)
        except nowait.WouldBlock:
            trace.ran = "rerun"
            return await self._in_thread(ctx, handler, context, params, self._pool)

    async def _in_thread(
        self,
        ctx: contextvars.Context,
        handler: Handler,
        context: RequestContext,
        params: dict[str, Any],
        pool: ThreadPoolExecutor,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, ctx.run, handler, context, params)
        if self._timeout is None:
            return await future
        try:
            # Not asyncio.wait_for: on 3.11 it wraps the future in another, which showed in the
            # per-request profile; a timeout scope cancels the same future at the same moment.
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            # The worker thread cannot be interrupted; it finishes and its result is dropped.
            raise DependencyTimeoutException(
                "The request to the HSM did not complete in time. Try again."
            ) from None

    def _emit(
        self,
        annotations: RequestScope,
        trace: _Trace,
        status: int,
        error_code: str | None,
        duration_ms: float,
    ) -> None:
        assert self._on_event is not None
        event = api_event(
            annotations,
            operation=trace.operation,
            principal_arn=trace.principal.arn if trace.principal else None,
            source_ip=trace.source_ip,
            status=status,
            error_code=error_code,
            duration_ms=duration_ms,
            params_redacted=(
                redact_sts_params(trace.params)
                if trace.sts
                else cloudhsm.audit_params(trace.operation, trace.params)
                if trace.cloudhsm
                else redact_params(trace.operation, trace.params)
            ),
            ran=trace.ran,
        )
        try:
            self._on_event(event)
        except Exception:  # an audit sink failure must not turn a served request into a crash
            logger.exception("on_event hook failed for request %s", annotations.request_id)


def create_asgi_app(
    *,
    operations: Mapping[str, Handler],
    verifier: SigV4Verifier | None,
    region: str,
    max_request_bytes: int,
    sts_operations: Mapping[str, StsHandler] | None = None,
    cloudhsm_endpoint: CloudHsmEndpoint | None = None,
    health: Callable[[], tuple[int, dict[str, Any]]] | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    on_event: Callable[[ApiEvent], None] | None = None,
    worker_threads: int = 32,
    handler_timeout_s: float | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
    anonymous_account: str = "",
    hsm_operations: frozenset[str] = frozenset(),
    inline_operations: frozenset[str] = frozenset(),
    ops_token: str | None = None,
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    console: SubApp | None = None,
) -> KmsApi:
    """Build the KMS ASGI app. `operations` maps KMS operation names to synchronous handlers;
    `sts_operations` (from `protocol.sts.build_sts_operations`) serves STS on the same endpoint,
    `cloudhsm_endpoint` (from `protocol.cloudhsm`) the CloudHSM v2 API."""
    if verifier is not None and verifier.region != region:
        raise ValueError(f"verifier is for {verifier.region}, the app for {region}")
    return KmsApi(
        operations=operations,
        verifier=verifier,
        max_request_bytes=max_request_bytes,
        sts_operations=sts_operations,
        cloudhsm_endpoint=cloudhsm_endpoint,
        health=health,
        metrics=metrics,
        on_event=on_event,
        worker_threads=worker_threads,
        handler_timeout_s=handler_timeout_s,
        body_timeout_s=body_timeout_s,
        anonymous_account=anonymous_account,
        hsm_operations=hsm_operations,
        inline_operations=inline_operations,
        ops_token=ops_token,
        max_connections_per_client=max_connections_per_client,
        console=console,
    )
