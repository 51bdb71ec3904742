"""SigV4 request authentication for the `kms`, `sts` and `cloudhsm` (CloudHSM v2) services in one
configured region.

Owns: `SigV4Verifier`, a pure function of (method, path, query, headers, body, now, service)
returning the authenticated `identity.sessions.Caller` or raising the KMS-named auth error AWS
would send (`protocol.sts` renames them for STS). Long-term keys (`AKIA...`) come from the
credentials file; temporary keys (`ASIA...`) are verified through the `SessionIssuer` with their
`X-Amz-Security-Token` header, which is required with them and refused with long-term keys.
Must not import: uvicorn or any HTTP framework type, pkcs11, service or backend modules.
WARNING: secret access keys live only in `Credential.secret`; never log or repr them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, quote

from hsmbridge.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from hsmbridge.identity.credentials import Credential, load_principals
from hsmbridge.identity.sessions import INVALID_TOKEN, Caller, SessionIssuer, is_temporary_key

ALGORITHM: Final = "AWS4-HMAC-SHA256"
SERVICE: Final = "kms"
SERVICES: Final = frozenset({"kms", "sts", "cloudhsm"})
MAX_SKEW: Final = timedelta(minutes=5)
_AMZ_DATE_FORMAT: Final = "%Y%m%dT%H%M%SZ"
_SPACES_RE: Final = re.compile(r"\s+")
_MISMATCH: Final = (
    "The request signature we calculated does not match the signature you provided. Check your"
    " AWS Secret Access Key and signing method. Consult the service documentation for details."
)


@lru_cache(maxsize=1024)
def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    # The four-HMAC derivation is the costliest part of verification and changes once a day per
    # key, so it is cached; the cache holds only secrets already held in memory.
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


@dataclass(frozen=True, slots=True)
class _AuthHeader:
    access_key_id: str
    date: str
    region: str
    service: str
    terminator: str
    signed_headers: tuple[str, ...]
    signature: str


@dataclass(frozen=True, slots=True)
class PendingSignature:
    """A request whose headers passed `SigV4Verifier.precheck`; its signature is not checked yet.
    WARNING: holds the caller's secret access key; never log or repr it."""

    auth: _AuthHeader
    amz_date: str
    caller: Caller
    secret: str = field(repr=False)


def _parse_authorization(value: str) -> _AuthHeader:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureException(
            f"Authorization header requires the '{ALGORITHM}' algorithm."
        )
    parts: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, val = item.strip().partition("=")
        if sep:
            parts[key] = val
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not parts.get(k)]
    if missing:
        raise IncompleteSignatureException(
            " ".join(f"Authorization header requires '{k}' parameter." for k in missing)
        )
    scope = parts["Credential"].split("/")
    if len(scope) != 5:
        raise IncompleteSignatureException(
            "Credential must have exactly 5 slash-delimited elements, e.g. "
            f"keyid/date/region/service/term, got '{parts['Credential']}'"
        )
    signed = tuple(parts["SignedHeaders"].split(";"))
    akid, date, region, service, terminator = scope
    return _AuthHeader(akid, date, region, service, terminator, signed, parts["Signature"])


def _canonical_query(query: str) -> str:
    if not query:
        return ""  # every KMS, STS and CloudHSM request: no need to parse
    pairs = parse_qsl(query, keep_blank_values=True)
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(pairs))


def _canonical_headers(headers: Mapping[str, str], signed: tuple[str, ...]) -> str:
    lines = []
    for name in signed:
        value = headers.get(name)
        if value is None:
            raise InvalidSignatureException(_MISMATCH)
        lines.append(f"{name}:{_SPACES_RE.sub(' ', value.strip())}\n")
    return "".join(lines)


def _signature(
    secret: str,
    auth: _AuthHeader,
    *,
    amz_date: str,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    """Recompute the request signature: canonical request, string to sign, derived-key HMAC."""
    payload_hash = hashlib.sha256(body).hexdigest()
    sent_hash = headers.get("x-amz-content-sha256")
    if sent_hash is not None and sent_hash != payload_hash:
        raise InvalidSignatureException(
            "The provided 'x-amz-content-sha256' header does not match what was computed."
        )
    canonical = "\n".join(
        (
            method,
            "/" if path in ("", "/") else quote(path, safe="/~"),
            _canonical_query(query),
            _canonical_headers(headers, auth.signed_headers),
            ";".join(auth.signed_headers),
            payload_hash,
        )
    )
    scope = f"{auth.date}/{auth.region}/{auth.service}/{auth.terminator}"
    to_sign = "\n".join(
        (ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    key = _signing_key(secret, auth.date, auth.region, auth.service)
    return hmac.digest(key, to_sign.encode(), "sha256").hex()  # one-shot: no HMAC object


def _default_clock() -> datetime:
    return datetime.now(UTC)


class SigV4Verifier:
    """Verifies AWS Signature Version 4 for `kms`, `sts` or `cloudhsm` in one region against known
    credentials and, with a `sessions` issuer, STS temporary credentials."""

    def __init__(
        self,
        credentials: Mapping[str, Credential],
        region: str,
        *,
        clock: Callable[[], datetime] = _default_clock,
        sessions: SessionIssuer | None = None,
        session_clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._credentials = dict(credentials)
        self._region = region
        self._clock = clock
        self._sessions = sessions
        # Session expiry follows the clock STS issued the session by (the service's wall clock,
        # which tests move); the signing-time window always follows `clock`.
        self._session_clock = session_clock or clock

    @property
    def region(self) -> str:
        return self._region

    @classmethod
    def from_file(
        cls,
        path: Path | str,
        region: str,
        *,
        sessions: SessionIssuer | None = None,
        session_clock: Callable[[], datetime] | None = None,
    ) -> SigV4Verifier:
        return cls(load_principals(path), region, sessions=sessions, session_clock=session_clock)

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: datetime | None = None,
        service: str = SERVICE,
    ) -> Caller:
        """Authenticate one request for `service` (the route decides: `kms`, `sts` or `cloudhsm`);
        `headers` has lower-case names, repeated values comma-joined.

        Raises MissingAuthenticationTokenException, IncompleteSignatureException,
        InvalidSignatureException, UnrecognizedClientException or ExpiredTokenException.
        """
        pending = self.precheck(headers, now=now, service=service)
        return self.finish(
            pending, method=method, path=path, query=query, headers=headers, body=body
        )

    def precheck(
        self, headers: Mapping[str, str], *, now: datetime | None = None, service: str = SERVICE
    ) -> PendingSignature:
        """The checks that need no body: header present and well formed, signing time within
        5 minutes, scope, a known access key (or a valid session token) and the headers that
        must be signed. Raises what `verify` raises; `finish` then checks the signature."""
        if service not in SERVICES:
            raise ValueError(f"not a service this endpoint serves: {service!r}")
        authorization = headers.get("authorization")
        if not authorization:
            raise MissingAuthenticationTokenException("Missing Authentication Token")
        auth = _parse_authorization(authorization)
        amz_date = self._check_date(headers.get("x-amz-date"), auth, now or self._clock())
        self._check_scope(auth, service)
        caller, secret = self._caller(auth.access_key_id, headers, now or self._session_clock())
        # x-amz-target picks the operation: if it were unsigned, a captured Encrypt could be
        # replayed within the time window as ScheduleKeyDeletion (its body names the KeyId and
        # unknown members are ignored). botocore and the other SDKs sign it.
        required = (
            ("host", "x-amz-date", "x-amz-target")
            if "x-amz-target" in headers
            else ("host", "x-amz-date")
        )
        for name in required:
            if name not in auth.signed_headers:
                raise InvalidSignatureException(
                    f"'{name}' must be a 'SignedHeader' in the AWS Authorization."
                )
        return PendingSignature(auth, amz_date, caller, secret)

    @staticmethod
    def finish(
        pending: PendingSignature,
        *,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> Caller:
        """The signature over the whole request: the caller if it matches, else
        InvalidSignatureException."""
        expected = _signature(
            pending.secret,
            pending.auth,
            amz_date=pending.amz_date,
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=body,
        )
        if not hmac.compare_digest(expected, pending.auth.signature):
            raise InvalidSignatureException(_MISMATCH)
        return pending.caller

    def _caller(
        self, access_key_id: str, headers: Mapping[str, str], now: datetime
    ) -> tuple[Caller, str]:
        """Who the access key is, and the secret the signature must have been made with."""
        token = headers.get("x-amz-security-token")
        if is_temporary_key(access_key_id):
            if not token or self._sessions is None:
                raise UnrecognizedClientException(INVALID_TOKEN)
            session = self._sessions.verify(access_key_id, token, now)
            caller = Caller(
                access_key_id, session.account_id, session.principal_arn, session=session
            )
            return caller, session.secret_access_key
        credential = self._credentials.get(access_key_id)
        if credential is None or token is not None:
            # AWS rejects a session token sent with long-term keys the same way.
            raise UnrecognizedClientException(INVALID_TOKEN)
        principal = credential.principal
        caller = Caller(
            access_key_id, principal.account_id, principal.arn, via_service=principal.via_service
        )
        return caller, credential.secret

    def _check_date(self, amz_date: str | None, auth: _AuthHeader, now: datetime) -> str:
        if not amz_date:
            raise IncompleteSignatureException(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date'"
                " header."
            )
        try:
            signed_at = _parse_amz_date(amz_date)
        except ValueError:
            raise IncompleteSignatureException(
                f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'."
            ) from None
        fmt = _AMZ_DATE_FORMAT
        if signed_at < now - MAX_SKEW:
            raise InvalidSignatureException(
                f"Signature expired: {amz_date} is now earlier than "
                f"{(now - MAX_SKEW).strftime(fmt)} ({now.strftime(fmt)} - 5 min.)"
            )
        if signed_at > now + MAX_SKEW:
            raise InvalidSignatureException(
                f"Signature not yet current: {amz_date} is still later than "
                f"{(now + MAX_SKEW).strftime(fmt)} ({now.strftime(fmt)} + 5 min.)"
            )
        if auth.date != amz_date[:8]:
            raise InvalidSignatureException(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date"
                f" from HTTP: '{auth.date}' != '{amz_date[:8]}', from '{amz_date}'."
            )
        return amz_date

    def _check_scope(self, auth: _AuthHeader, service: str) -> None:
        # Wording as AWS sends it (observed in SDK issue reports); the region message names the
        # region the client used, the service message names the one expected.
        if auth.region != self._region:
            raise InvalidSignatureException(
                f"Credential should be scoped to a valid region, not '{auth.region}'. "
            )
        if auth.service != service:
            raise InvalidSignatureException(
                f"Credential should be scoped to correct service: '{service}'. "
            )
        if auth.terminator != "aws4_request":
            raise InvalidSignatureException(
                "Credential should be scoped with a valid terminator: 'aws4_request', "
                f"not '{auth.terminator}'. "
            )


def _parse_amz_date(text: str) -> datetime:
    """X-Amz-Date (`20241101T120000Z`), as `strptime(text, _AMZ_DATE_FORMAT)` but stricter (two
    digits per field, always) and at a third of its cost, which showed in the per-request
    profile. ValueError for anything else, including an impossible date."""
    if len(text) != 16 or text[8] != "T" or text[15] != "Z" or not text.isascii():
        raise ValueError(text)
    if not (text[:8].isdigit() and text[9:15].isdigit()):
        raise ValueError(text)
    return datetime(
        int(text[0:4]), int(text[4:6]), int(text[6:8]),
        int(text[9:11]), int(text[11:13]), int(text[13:15]), tzinfo=UTC,
    )  # fmt: skip
