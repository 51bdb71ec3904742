"""STS temporary credentials that verify themselves: nothing is stored, any worker accepts them.

Owns: `SessionIssuer` (issues `TemporaryCredentials` and verifies the session token a request
carries), `SessionIdentity` (what a verified token says: who the session is, which role, which
session policy, until when) and `Caller` (the identity SigV4 authenticated: long-term key or
session).

The session token is `HB1.<payload>.<mac>`: the payload (compact JSON, base64url) names the access
key id, principal ARN, account, role ARN and id, session name, session policy, source identity,
user id and expiry; the MAC is HMAC-SHA256 over it under a key derived from the server key
(`sts.key`, loaded by `bootstrap.sessions`). The secret access key is HMAC(server key, payload),
so a request signed with the session's credentials is verified by recomputing it: a restart or
another worker process holding the same key accepts every session it did not issue itself.
Must not import anything from hsmbridge but `errors`.
WARNING: session tokens and secret access keys are bearer secrets: they live only in fields with
repr=False and are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from hsmbridge.errors import ExpiredTokenException, UnrecognizedClientException

KEY_BYTES: Final = 32
TEMPORARY_KEY_PREFIX: Final = "ASIA"
TOKEN_PREFIX: Final = "HB1"  # noqa: S105 - a format tag
INVALID_TOKEN: Final = "The security token included in the request is invalid."  # noqa: S105
EXPIRED_TOKEN: Final = "The security token included in the request is expired"  # noqa: S105
_AKID_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MAX_TOKEN_CHARS: Final = 8192  # a 2048-char session policy and the rest fit with room to spare


def is_temporary_key(access_key_id: str) -> bool:
    return access_key_id.startswith(TEMPORARY_KEY_PREFIX)


@dataclass(frozen=True, slots=True)
class TemporaryCredentials:
    """What AssumeRole and GetSessionToken return. The secret and the token are never repr'd."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime


@dataclass(frozen=True, slots=True)
class SessionIdentity:
    """The facts a verified session token carries."""

    access_key_id: str
    principal_arn: str  # arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION, or the user's ARN
    account_id: str
    expiration: datetime
    role_arn: str | None = None  # None: a GetSessionToken session of a user
    role_id: str | None = None
    session_name: str | None = None
    session_policy: str | None = None  # the AssumeRole Policy parameter, as JSON text
    source_identity: str | None = None
    user_id: str | None = None  # GetSessionToken sessions: the user's IAM id, when known
    secret_access_key: str = field(default="", repr=False, compare=False)

    @property
    def is_role_session(self) -> bool:
        return self.role_arn is not None

    @property
    def user_id_for_caller(self) -> str:
        """GetCallerIdentity's UserId: ROLEID:SESSION for role sessions, else the user's id."""
        if self.role_id is not None and self.session_name is not None:
            return f"{self.role_id}:{self.session_name}"
        return self.user_id or self.access_key_id


@dataclass(frozen=True, slots=True)
class Caller:
    """Who signed a request: a long-term key of the credentials file, or an STS session."""

    access_key_id: str
    account_id: str
    arn: str
    via_service: str | None = None
    session: SessionIdentity | None = None

    @property
    def is_temporary(self) -> bool:
        return self.session is not None

    @property
    def role_arn(self) -> str | None:
        return self.session.role_arn if self.session else None

    @property
    def session_policy(self) -> str | None:
        return self.session.session_policy if self.session else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # validate=True: any character outside the alphabet is an error, not silently skipped, so
    # one token has one spelling.
    padded = (text + "=" * (-len(text) % 4)).encode("ascii")
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _new_access_key_id() -> str:
    return TEMPORARY_KEY_PREFIX + "".join(secrets.choice(_AKID_ALPHABET) for _ in range(16))


_FIELDS: Final = (
    ("k", "access_key_id"),
    ("p", "principal_arn"),
    ("a", "account_id"),
    ("r", "role_arn"),
    ("ri", "role_id"),
    ("s", "session_name"),
    ("sp", "session_policy"),
    ("si", "source_identity"),
    ("u", "user_id"),
)

_REQUIRED: Final = ("access_key_id", "principal_arn", "account_id")


class SessionIssuer:
    """Issues and verifies self-contained session tokens under one 32-byte server key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the STS server key must be {KEY_BYTES} bytes")
        # Separate keys for the two uses, so a token MAC can never double as a secret key.
        self._mac_key = hmac.new(key, b"hsmbridge sts token mac v1", hashlib.sha256).digest()
        self._secret_key = hmac.new(key, b"hsmbridge sts secret v1", hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "SessionIssuer(<key>)"

    def _secret(self, payload: bytes) -> str:
        digest = hmac.new(self._secret_key, payload, hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")[:40]

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._mac_key, payload, hashlib.sha256).digest()

    def issue(
        self,
        *,
        principal_arn: str,
        account_id: str,
        expiration: datetime,
        role_arn: str | None = None,
        role_id: str | None = None,
        session_name: str | None = None,
        session_policy: str | None = None,
        source_identity: str | None = None,
        user_id: str | None = None,
    ) -> TemporaryCredentials:
        """New credentials for a session that ends at `expiration` (whole seconds, UTC)."""
        expires = int(expiration.timestamp())
        values: dict[str, Any] = {
            "access_key_id": _new_access_key_id(),
            "principal_arn": principal_arn,
            "account_id": account_id,
            "role_arn": role_arn,
            "role_id": role_id,
            "session_name": session_name,
            "session_policy": session_policy,
            "source_identity": source_identity,
            "user_id": user_id,
        }
        doc: dict[str, Any] = {"v": 1, "e": expires}
        doc.update({short: values[name] for short, name in _FIELDS if values[name] is not None})
        payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        token = f"{TOKEN_PREFIX}.{_b64(payload)}.{_b64(self._mac(payload))}"
        return TemporaryCredentials(
            access_key_id=values["access_key_id"],
            secret_access_key=self._secret(payload),
            session_token=token,
            expiration=datetime.fromtimestamp(expires, UTC),
        )

    def verify(self, access_key_id: str, token: str, now: datetime) -> SessionIdentity:
        """The session `token` describes, if this server issued it for `access_key_id`.

        Raises UnrecognizedClientException for a malformed, forged or tampered token or one of
        another access key, and ExpiredTokenException once the session has ended.
        """
        payload = self._authentic_payload(token)
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("unknown token version")
            expires = doc["e"]
            values: dict[str, str | None] = {}
            for short, name in _FIELDS:
                value = doc.get(short)
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"malformed token field {short}")
                values[name] = value
            if not isinstance(expires, int):
                raise ValueError("malformed expiry")
            akid, arn, account = (values.pop(k) for k in _REQUIRED)
            if not akid or not arn or not account:
                raise ValueError("token lacks an identity")
        except (ValueError, KeyError):
            # Authentic but unreadable: only a server with a different code version issues
            # those; treat it as any other token we cannot use.
            raise UnrecognizedClientException(INVALID_TOKEN) from None
        if not hmac.compare_digest(akid.encode(), access_key_id.encode()):
            raise UnrecognizedClientException(INVALID_TOKEN)
        expiration = datetime.fromtimestamp(expires, UTC)
        if now >= expiration:
            raise ExpiredTokenException(EXPIRED_TOKEN)
        return SessionIdentity(
            access_key_id=akid,
            principal_arn=arn,
            account_id=account,
            expiration=expiration,
            role_arn=values["role_arn"],
            role_id=values["role_id"],
            session_name=values["session_name"],
            session_policy=values["session_policy"],
            source_identity=values["source_identity"],
            user_id=values["user_id"],
            secret_access_key=self._secret(payload),
        )

    def _authentic_payload(self, token: str) -> bytes:
        if len(token) > _MAX_TOKEN_CHARS:
            raise UnrecognizedClientException(INVALID_TOKEN)
        prefix, _, rest = token.partition(".")
        encoded, _, mac = rest.partition(".")
        if prefix != TOKEN_PREFIX or not encoded or not mac:
            raise UnrecognizedClientException(INVALID_TOKEN)
        try:
            payload = _unb64(encoded)
            sent_mac = _unb64(mac)
        except (ValueError, binascii.Error):
            raise UnrecognizedClientException(INVALID_TOKEN) from None
        if not hmac.compare_digest(self._mac(payload), sent_mac):
            raise UnrecognizedClientException(INVALID_TOKEN)
        return payload
