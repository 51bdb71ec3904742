"""The one table from backend errors to the KMS errors a client sees, chosen for SDK retries.

Owns: `to_kms_error()`. Retryable conditions (HSM busy, session lost, device gone, HSM
unreachable) become fault errors (5xx) so SDKs retry them; everything the caller must change
becomes a 400. Must not import protocol, http or cli.
"""

from __future__ import annotations

from hsmbridge.backend import (
    BackendError,
    BadCiphertextError,
    DeadlineExceededError,
    DeviceLostError,
    DuplicateLabelError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
    MisconfiguredError,
    NonCompliantKeyError,
    StoreSaturatedError,
    TransientHsmError,
)
from hsmbridge.errors import (
    DependencyTimeoutException,
    InvalidCiphertextException,
    KeyUnavailableException,
    KmsError,
    KMSInternalException,
    KMSInvalidStateException,
)

# NOTE: differs from KMS, which answers KMSInvalidStateException (400, not retried) with "KMS
# cannot communicate with your CloudHSM cluster"; a retryable 500 lets SDKs ride out
# HSM blips and throttling, which is what a stand-in under CI load needs.
# None: the operation's retryable fault class (see `to_kms_error`).
_TABLE: dict[type[BackendError], tuple[type[KmsError] | None, str]] = {
    TransientHsmError: (
        None,
        "The CloudHSM cluster is busy or the HSM session was lost; retry the request.",
    ),
    DeviceLostError: (
        None,
        "KMS cannot communicate with your CloudHSM cluster; retry the request.",
    ),
    HsmUnreachableError: (
        None,
        "KMS cannot communicate with your CloudHSM cluster; retry the request.",
    ),
    # Every operation that reaches an HSM lists DependencyTimeoutException: the call was never
    # started, so retrying it is safe.
    DeadlineExceededError: (
        DependencyTimeoutException,
        "The request to the HSM did not start before the request's deadline. Try again.",
    ),
    StoreSaturatedError: (
        None,
        "Too many requests are waiting for the CloudHSM cluster of this custom key store; "
        "retry the request.",
    ),
    LoginError: (
        None,
        "KMS cannot log in to your CloudHSM cluster as kmsuser; disconnect the custom key store, "
        "update its KeyStorePassword and connect it again.",
    ),
    BadCiphertextError: (
        InvalidCiphertextException,
        "The ciphertext, the encryption context or the key does not match.",
    ),
    KeyMissingError: (
        KMSInvalidStateException,
        "The key material of {arn} is not in the CloudHSM cluster of its custom key store.",
    ),
    DuplicateLabelError: (
        KMSInternalException,
        "More than one HSM key is labelled {arn}; run `hsmbridge audit` on its custom key store.",
    ),
    NonCompliantKeyError: (
        KMSInternalException,
        "The HSM created a key without the required attributes; it was destroyed.",
    ),
    MisconfiguredError: (
        KMSInternalException,
        "The HSM rejected the request; check the HSM profile of this cluster.",
    ),
}


def to_kms_error(
    exc: BackendError,
    arn: str = "the key",
    *,
    retryable: type[KmsError] = KeyUnavailableException,
) -> KmsError:
    """`retryable` is the fault the operation's model lists for "try again": cryptographic
    operations list KeyUnavailableException; CreateKey and GenerateRandom only
    DependencyTimeoutException."""
    for cls in type(exc).__mro__:
        entry = _TABLE.get(cls)
        if entry is not None:
            kms_cls, message = entry
            return (kms_cls or retryable)(message.format(arn=arn))
    return KMSInternalException("The HSM reported an internal error.")
