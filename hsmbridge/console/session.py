"""Console sessions and CSRF tokens: signed, self-contained, checked in constant time.

Owns: `console_key` (the console's 32-byte key, derived from the server key in `sts.key` with its
own label, so it is private, shared by every worker process and survives restarts without a new
secret file; replacing `sts.key` ends every console session too), `SessionCodec` (the session
cookie: access key id, principal ARN, expiry and a random nonce, HMAC-SHA256-signed; nothing
secret in it) and the CSRF tokens (an HMAC of the session nonce under a second derived key, so a
token is valid for one session only; before sign-in, of a random pre-session nonce kept in its
own cookie). A session ends at its expiry or at sign-out: sign-out records the session's nonce in
a `SignOutLog` until the session would have expired, and every request checks it. The server's
log is the metadata database (`MetadataStore` has both methods), so a signed-out cookie is refused
by every worker process and every instance, not only the one that signed it out.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

SESSION_COOKIE: Final = "hsmbridge-console-session"
PRESESSION_COOKIE: Final = "hsmbridge-console-signin"
SESSION_LIFETIME_S: Final = 12 * 3600
_VERSION: Final = "v1"


def console_key(server_key: bytes) -> bytes:
    """The console's key, derived from the server key (`sts.key`) under its own label."""
    return hmac.new(server_key, b"hsmbridge console session v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    padded = (text + "=" * (-len(text) % 4)).encode("ascii")
    return base64.b64decode(padded, altchars=b"-_", validate=True)


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: who, until when, and the nonce its CSRF token is made from."""

    access_key_id: str
    principal_arn: str
    expires_at: float
    nonce: str


class SignOutLog(Protocol):
    """Where ended sessions are remembered (the metadata store, for a server)."""

    def record_sign_out(self, nonce: str, expires_at: float, now: float) -> None: ...
    def signed_out(self, nonce: str) -> bool: ...


class InProcessSignOuts:
    """A `SignOutLog` of this process alone: for a codec with no database behind it."""

    def __init__(self) -> None:
        self._ended: dict[str, float] = {}  # nonce -> its session's expiry
        self._lock = threading.Lock()

    def record_sign_out(self, nonce: str, expires_at: float, now: float) -> None:
        with self._lock:
            for old, expiry in list(self._ended.items()):
                if expiry <= now:
                    del self._ended[old]
            self._ended[nonce] = expires_at

    def signed_out(self, nonce: str) -> bool:
        with self._lock:
            return nonce in self._ended


class SessionCodec:
    """Makes and checks session cookies and CSRF tokens under one console key."""

    def __init__(
        self,
        key: bytes,
        *,
        sign_outs: SignOutLog | None = None,
        lifetime_s: float = SESSION_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(key) != 32:
            raise ValueError("the console key must be 32 bytes")
        self._mac_key = hmac.new(key, b"session mac", hashlib.sha256).digest()
        self._csrf_key = hmac.new(key, b"csrf token", hashlib.sha256).digest()
        self._lifetime = lifetime_s
        self._clock = clock
        self._sign_outs = sign_outs if sign_outs is not None else InProcessSignOuts()

    def __repr__(self) -> str:
        return "SessionCodec(<key>)"

    @property
    def lifetime_s(self) -> float:
        return self._lifetime

    def issue(self, access_key_id: str, principal_arn: str) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(
            access_key_id,
            principal_arn,
            self._clock() + self._lifetime,
            secrets.token_urlsafe(24),
        )
        payload = json.dumps(
            {
                "k": session.access_key_id,
                "p": session.principal_arn,
                "e": session.expires_at,
                "n": session.nonce,
            },
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._mac_key, payload, hashlib.sha256).digest()
        return session, f"{_VERSION}.{_b64(payload)}.{_b64(mac)}"

    def verify(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None when it is missing, forged, expired or ended."""
        session = self._authentic(cookie) if cookie else None
        if session is None or session.expires_at <= self._clock():
            return None
        if self._sign_outs.signed_out(session.nonce):
            return None
        return session

    def _authentic(self, cookie: str) -> Session | None:
        """The session of a cookie this key signed (expired or not), else None."""
        version, _, rest = cookie.partition(".")
        payload_b64, _, mac_b64 = rest.partition(".")
        if version != _VERSION or not payload_b64 or not mac_b64:
            return None
        try:
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        except (binascii.Error, ValueError):
            return None
        expected = hmac.new(self._mac_key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            raw = json.loads(payload)
            return Session(str(raw["k"]), str(raw["p"]), float(raw["e"]), str(raw["n"]))
        except (ValueError, KeyError, TypeError):
            return None

    def revoke(self, session: Session) -> None:
        """Sign-out: this session's cookie is refused from now on, wherever the log is shared."""
        self._sign_outs.record_sign_out(session.nonce, session.expires_at, self._clock())

    def csrf_token(self, nonce: str) -> str:
        """The CSRF token of a session (or of a pre-session nonce, on the sign-in form)."""
        return _b64(hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).digest())

    def csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(self.csrf_token(nonce).encode(), token.encode())


def new_presession_nonce() -> str:
    return secrets.token_urlsafe(24)
