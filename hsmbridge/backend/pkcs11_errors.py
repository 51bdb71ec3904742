"""The single table from python-pkcs11 exception classes to hsmbridge's backend error vocabulary.

Owns: `translate()` and the transient sub-kinds the session pool acts on (`SessionLostError`,
`StaleHandleError`, `LoginLostError`, `HsmBusyError`). Everything else in hsmbridge sees only the
classes of `hsmbridge.backend.errors`. Matching is by exception *class* (python-
pkcs11 exceptions carry no CKR code); message text is read only for the two documented fallbacks
python-pkcs11 leaves us: the bare `PKCS11Error("Unmapped error code 0x..")` and its fixed
"Initialisation error (not initialized)" text for CKR_CRYPTOKI_NOT_INITIALIZED, which has no class.

Must not import: anything in hsmbridge above `hsmbridge.backend.errors` and `hsmbridge.config`.
It is one of the three modules allowed to import `pkcs11`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from pkcs11 import exceptions as p11e

from hsmbridge.backend.errors import (
    BackendError,
    BadCiphertextError,
    DeviceLostError,
    DuplicateLabelError,
    HsmInternalError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
    MisconfiguredError,
    TransientHsmError,
)
from hsmbridge.config import HsmProfile
from hsmbridge.model import ConnectionErrorCode

# A DeviceError is a throttled call on CloudHSM until it repeats this many
# times in a row on one library; then the device is treated as lost and the library re-initialised
# (the xks-proxy `is_ckr_fatal` pattern).
DEVICE_ERROR_STREAK_LIMIT = 3


class HsmBusyError(TransientHsmError):
    """The HSM is throttling or the session has an operation stuck open; evict and retry."""


class SessionLostError(TransientHsmError):
    """The session handle is gone; evict the session (its key-handle cache goes with it), retry."""


class StaleHandleError(TransientHsmError):
    """A cached key handle no longer names an object (destroyed, or re-numbered); re-find it."""


class LoginLostError(SessionLostError):
    """The process-wide login is gone (someone logged out); log in again, then retry."""


_Factory = Callable[[str], BackendError]


def _login(reason: ConnectionErrorCode) -> _Factory:
    return lambda msg: LoginError(reason, msg)


_TABLE: Mapping[type[Exception], _Factory] = {
    # --- login: the KMS ConnectionErrorCode each one becomes -------------------------------------
    p11e.PinIncorrect: _login(ConnectionErrorCode.INVALID_CREDENTIALS),
    # PinInvalid: the PIN has characters the HSM refuses; PinLenRange: CloudHSM passwords are
    # 8-32 characters.
    p11e.PinInvalid: _login(ConnectionErrorCode.INVALID_CREDENTIALS),
    p11e.PinLenRange: _login(ConnectionErrorCode.INVALID_CREDENTIALS),
    p11e.PinExpired: _login(ConnectionErrorCode.INVALID_CREDENTIALS),
    p11e.PinLocked: _login(ConnectionErrorCode.USER_LOCKED_OUT),
    p11e.UserAlreadyLoggedIn: _login(ConnectionErrorCode.USER_LOGGED_IN),
    p11e.AnotherUserAlreadyLoggedIn: _login(ConnectionErrorCode.USER_LOGGED_IN),
    p11e.UserTooManyTypes: _login(ConnectionErrorCode.USER_LOGGED_IN),
    # CKR_USER_PIN_NOT_INITIALIZED: the token has no normal-user PIN, i.e. the crypto user we were
    # told to log in as was never created there. KMS reports a missing kmsuser as USER_NOT_FOUND.
    p11e.UserPinNotInitialized: _login(ConnectionErrorCode.USER_NOT_FOUND),
    # --- transient: retry after evicting the session or logging in again --------------------------
    # What else means "HSM busy" differs by vendor: the profile's `busy_errors`, read in translate.
    p11e.SessionCount: HsmBusyError,
    p11e.SessionHandleInvalid: SessionLostError,
    p11e.SessionClosed: SessionLostError,
    p11e.ObjectHandleInvalid: StaleHandleError,
    p11e.KeyHandleInvalid: StaleHandleError,
    p11e.UserNotLoggedIn: LoginLostError,
    # --- device lost: re-initialise the library ---------------------------------------------------
    p11e.DeviceRemoved: DeviceLostError,
    p11e.TokenNotPresent: DeviceLostError,
    p11e.TokenNotRecognised: DeviceLostError,
    # --- where the key or token is ----------------------------------------------------------------
    p11e.NoSuchToken: HsmUnreachableError,
    p11e.SlotIDInvalid: HsmUnreachableError,
    p11e.NoSuchKey: KeyMissingError,
    p11e.MultipleObjectsReturned: DuplicateLabelError,
    # --- the HSM rejected what we asked for: profile/template problem -----------------------------
    p11e.MultipleTokensReturned: MisconfiguredError,
    p11e.TemplateInconsistent: MisconfiguredError,  # CloudHSM: unsupported attribute (§4.5)
    p11e.TemplateIncomplete: MisconfiguredError,
    p11e.AttributeTypeInvalid: MisconfiguredError,
    p11e.AttributeValueInvalid: MisconfiguredError,
    p11e.AttributeReadOnly: MisconfiguredError,
    p11e.MechanismInvalid: MisconfiguredError,
    p11e.KeySizeRange: MisconfiguredError,
    p11e.KeyTypeInconsistent: MisconfiguredError,
    p11e.FunctionNotSupported: MisconfiguredError,
    p11e.RandomNoRNG: MisconfiguredError,
    p11e.SessionReadOnly: MisconfiguredError,
    p11e.TokenWriteProtected: MisconfiguredError,
    # --- bugs in how we call the library: never retried ------------------------------------------
    p11e.ArgumentsBad: HsmInternalError,
    p11e.MechanismParamInvalid: HsmInternalError,
    p11e.AttributeSensitive: HsmInternalError,  # we asked for CKA_VALUE of a sensitive key
    p11e.GeneralError: HsmInternalError,  # SoftHSM decrypt: see decrypt_auth_failure_errors
}

# Only meaningful as "the tag did not verify" while decrypting (CloudHSM, §2.5 [unverified]).
_DECRYPT_AUTH_FAILURES: frozenset[type[Exception]] = frozenset(
    {p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange}
)

_UNMAPPED_RE = re.compile(r"^Unmapped error code (0x[0-9a-fA-F]+)$")
_NOT_INITIALIZED_TEXT = "Initialisation error (not initialized)"  # python-pkcs11 _pkcs11.pxd
CKR_NAMES: Mapping[int, str] = {
    0x1B: "CKR_ACTION_PROHIBITED",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


def translate(
    exc: BaseException,
    *,
    during_decrypt: bool,
    profile: HsmProfile,
    device_error_streak: int = 0,
) -> BackendError:
    """Map one exception raised by python-pkcs11 onto the backend vocabulary.

    `device_error_streak` is how many DeviceErrors in a row the library has seen, this one
    included; at DEVICE_ERROR_STREAK_LIMIT a DeviceError means the device is lost.
    The result's message never contains secrets: it names the exception class and CKR code only.
    """
    if isinstance(exc, BackendError):
        return exc
    cls = type(exc)
    name = cls.__name__
    if during_decrypt and (
        cls in _DECRYPT_AUTH_FAILURES or name in profile.decrypt_auth_failure_errors
    ):
        return BadCiphertextError(f"AES-GCM authentication failed ({name})")
    if cls is p11e.DeviceError and device_error_streak >= DEVICE_ERROR_STREAK_LIMIT:
        return DeviceLostError(f"DeviceError repeated {device_error_streak} times in a row")
    factory = HsmBusyError if name in profile.busy_errors else _lookup(cls)
    if factory is not None:
        return factory(f"PKCS#11 {name}{_detail(exc)}")
    if cls is p11e.PKCS11Error:
        return _bare(exc)
    return HsmInternalError(f"unexpected {name} from the PKCS#11 layer{_detail(exc)}")


def _lookup(cls: type[BaseException]) -> _Factory | None:
    for base in cls.__mro__:
        factory = _TABLE.get(base)
        if factory is not None:
            return factory
        if base is p11e.PKCS11Error:
            break
    return None


def _bare(exc: BaseException) -> BackendError:
    """python-pkcs11's fallback for CKR codes it has no class for."""
    text = str(exc)
    if text.startswith(_NOT_INITIALIZED_TEXT):
        return DeviceLostError("PKCS#11 library is not initialised (CKR_CRYPTOKI_NOT_INITIALIZED)")
    match = _UNMAPPED_RE.match(text)
    if match is None:
        return HsmInternalError(f"PKCS#11 error without a class: {text[:120]}")
    code = int(match.group(1), 16)
    label = CKR_NAMES.get(code, "vendor-defined or unknown")
    return HsmInternalError(f"PKCS#11 return code {code:#x} ({label})")


def _detail(exc: BaseException) -> str:
    # python-pkcs11 messages are fixed strings or empty; they never echo arguments such as PINs.
    text = str(exc)
    return f": {text[:120]}" if text else ""


def needs_relogin(err: BackendError) -> bool:
    return isinstance(err, LoginLostError)


def evicts_session(err: BackendError) -> bool:
    return isinstance(err, HsmBusyError | SessionLostError)


def is_retryable(err: BackendError) -> bool:
    """Transient errors are retried; everything else (bad ciphertext, login, ...) never is."""
    return isinstance(err, TransientHsmError)
