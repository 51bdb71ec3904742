"""The backend's error vocabulary, sorted by what the caller must do about each error.

Owns: `BackendError` and its subclasses. The single table that maps python-pkcs11 exception
classes onto this vocabulary lives in `hsmbridge.backend.pkcs11_errors` (the only other place
allowed to import `pkcs11`); this module imports nothing from PKCS#11 so the layers above can
catch these classes.
"""

from __future__ import annotations

from hsmbridge.model import ConnectionErrorCode


class BackendError(Exception):
    """Base of everything an HsmBackend raises."""


class TransientHsmError(BackendError):
    """Retry after evicting the session (throttling, busy, session/handle lost)."""


class DeviceLostError(BackendError):
    """The device or library went away; re-initialise the library, then log in again."""


class DeadlineExceededError(BackendError):
    """The request's deadline passed before the HSM could take the call; it was not started."""


class StoreSaturatedError(BackendError):
    """Too many calls are already running or waiting on this store's HSM; retry later."""


class HsmUnreachableError(BackendError):
    """The PKCS#11 module cannot be loaded or the token is not present."""


class LoginError(BackendError):
    """kmsuser could not log in; `reason` is the ConnectionErrorCode a connect ends with."""

    def __init__(self, reason: ConnectionErrorCode, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyMissingError(BackendError):
    """No key with the requested label exists on the token."""


class DuplicateLabelError(BackendError):
    """More than one key carries the label, or a create would add a second one."""


class BadCiphertextError(BackendError):
    """AES-GCM authentication failed: wrong key, wrong AAD, or tampered data."""


class NonCompliantKeyError(BackendError):
    """A new key read back with the wrong attributes; it was destroyed before this was raised."""


class MisconfiguredError(BackendError):
    """The HSM rejected our template or parameters: a profile or configuration problem."""


class HsmInternalError(BackendError):
    """An unmapped PKCS#11 return code or a bug in how we call the library."""
