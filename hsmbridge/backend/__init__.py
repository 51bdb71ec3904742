"""The HSM backend: the `HsmBackend` seam, its error vocabulary, and the PKCS#11 implementation.

Only `hsmbridge.backend.pkcs11`, `hsmbridge.backend.sessions` and
`hsmbridge.backend.pkcs11_errors` import python-pkcs11.
"""

from hsmbridge.backend.errors import (
    BackendError,
    BadCiphertextError,
    DeadlineExceededError,
    DeviceLostError,
    DuplicateLabelError,
    HsmInternalError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
    MisconfiguredError,
    NonCompliantKeyError,
    StoreSaturatedError,
    TransientHsmError,
)
from hsmbridge.backend.interface import HsmBackend, HsmConnector, HsmHealth, HsmKeyInfo, Sealed

__all__ = [
    "BackendError",
    "BadCiphertextError",
    "DeadlineExceededError",
    "DeviceLostError",
    "DuplicateLabelError",
    "HsmBackend",
    "HsmConnector",
    "HsmHealth",
    "HsmInternalError",
    "HsmKeyInfo",
    "HsmUnreachableError",
    "KeyMissingError",
    "LoginError",
    "MisconfiguredError",
    "NonCompliantKeyError",
    "Sealed",
    "StoreSaturatedError",
    "TransientHsmError",
]
