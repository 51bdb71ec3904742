"""Every error hsmbridge reports to a KMS client, named after the KMS error shape it stands for.

Owns: the `KmsError` base and its subclasses. `code` is the exact `__type` a KMS client parses and
`fault` copies the botocore model's fault flag (server-side errors are retried by SDKs).
Must not import: anything HTTP, anything PKCS#11, anything else from hsmbridge. `api/errors.py`
alone turns these into HTTP responses.
"""

from __future__ import annotations

from typing import ClassVar


class HsmbridgeError(Exception):
    """Base of every error hsmbridge raises on purpose; the CLI prints these as one line."""


class KmsError(HsmbridgeError):
    """An error with a KMS exception name and a message a person can act on."""

    code: ClassVar[str] = "KMSInternalException"
    fault: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- client errors (model fault = client; HTTP 400, not retried) --------------------------------


class ValidationException(KmsError):
    code = "ValidationException"


class SerializationException(KmsError):
    code = "SerializationException"


class UnknownOperationException(KmsError):
    code = "UnknownOperationException"


class AccessDeniedException(KmsError):
    code = "AccessDeniedException"


class NotFoundException(KmsError):
    code = "NotFoundException"


class AlreadyExistsException(KmsError):
    code = "AlreadyExistsException"


class DisabledException(KmsError):
    code = "DisabledException"


class KMSInvalidStateException(KmsError):
    code = "KMSInvalidStateException"


class InvalidArnException(KmsError):
    code = "InvalidArnException"


class InvalidAliasNameException(KmsError):
    code = "InvalidAliasNameException"


class InvalidCiphertextException(KmsError):
    code = "InvalidCiphertextException"


class IncorrectKeyException(KmsError):
    code = "IncorrectKeyException"


class InvalidKeyUsageException(KmsError):
    code = "InvalidKeyUsageException"


class InvalidGrantTokenException(KmsError):
    code = "InvalidGrantTokenException"


class InvalidMarkerException(KmsError):
    code = "InvalidMarkerException"


class LimitExceededException(KmsError):
    code = "LimitExceededException"


class MalformedPolicyDocumentException(KmsError):
    code = "MalformedPolicyDocumentException"


class TagException(KmsError):
    code = "TagException"


class UnsupportedOperationException(KmsError):
    code = "UnsupportedOperationException"


class DryRunOperationException(KmsError):
    code = "DryRunOperationException"


class CustomKeyStoreNotFoundException(KmsError):
    code = "CustomKeyStoreNotFoundException"


class CustomKeyStoreNameInUseException(KmsError):
    code = "CustomKeyStoreNameInUseException"


class CustomKeyStoreInvalidStateException(KmsError):
    code = "CustomKeyStoreInvalidStateException"


class CustomKeyStoreHasCMKsException(KmsError):
    code = "CustomKeyStoreHasCMKsException"


class CloudHsmClusterNotFoundException(KmsError):
    code = "CloudHsmClusterNotFoundException"


class CloudHsmClusterNotActiveException(KmsError):
    code = "CloudHsmClusterNotActiveException"


class CloudHsmClusterInUseException(KmsError):
    code = "CloudHsmClusterInUseException"


class CloudHsmClusterNotRelatedException(KmsError):
    code = "CloudHsmClusterNotRelatedException"


class CloudHsmClusterInvalidConfigurationException(KmsError):
    code = "CloudHsmClusterInvalidConfigurationException"


class IncorrectTrustAnchorException(KmsError):
    code = "IncorrectTrustAnchorException"


class ThrottlingException(KmsError):
    code = "ThrottlingException"


# --- authentication errors (common AWS errors, not in the KMS model) ----------------------------


class MissingAuthenticationTokenException(KmsError):
    code = "MissingAuthenticationTokenException"


class IncompleteSignatureException(KmsError):
    code = "IncompleteSignatureException"


class InvalidSignatureException(KmsError):
    code = "InvalidSignatureException"


class UnrecognizedClientException(KmsError):
    code = "UnrecognizedClientException"


# --- server faults (model fault = server; HTTP 5xx, retried by SDKs) ----------------------------


class KMSInternalException(KmsError):
    code = "KMSInternalException"
    fault = True


class KeyUnavailableException(KmsError):
    code = "KeyUnavailableException"
    fault = True


class DependencyTimeoutException(KmsError):
    code = "DependencyTimeoutException"
    fault = True


# --- configuration errors (operator-facing, never sent over the wire) ---------------------------


class ConfigError(HsmbridgeError):
    """The configuration, an HSM profile or an inventory file is missing or malformed."""
