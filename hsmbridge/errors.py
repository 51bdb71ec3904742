"""Every error hsmbridge reports to a KMS client, named after the KMS error shape it stands for.

Owns: the `KmsError` base and its subclasses. `code` is the exact `__type` a KMS client parses and
`fault` copies the botocore model's fault flag (server-side errors are retried by SDKs).
Must not import: anything HTTP, anything PKCS#11, anything else from hsmbridge. `protocol/errors.py`
alone turns these into HTTP responses.
"""

from __future__ import annotations

from typing import ClassVar


class HsmbridgeError(Exception):
    """Base of every error hsmbridge raises on purpose; the CLI prints these as one line."""


class KmsError(HsmbridgeError):
    """An error with a KMS exception name and a message a person can act on."""

    # A bare KmsError is an internal fault; every subclass names its own shape and flag.
    code: ClassVar[str] = "KMSInternalException"
    fault: ClassVar[bool] = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --- client errors (model fault = client; HTTP 400, not retried) --------------------------------


class ClientError(KmsError):
    """Base of the errors the caller must fix (model fault = client)."""

    fault = False


class ValidationException(ClientError):
    code = "ValidationException"


class SerializationException(ClientError):
    code = "SerializationException"


class UnknownOperationException(ClientError):
    code = "UnknownOperationException"


class AccessDeniedException(ClientError):
    code = "AccessDeniedException"


class NotFoundException(ClientError):
    code = "NotFoundException"


class AlreadyExistsException(ClientError):
    code = "AlreadyExistsException"


class DisabledException(ClientError):
    code = "DisabledException"


class KMSInvalidStateException(ClientError):
    code = "KMSInvalidStateException"


class InvalidArnException(ClientError):
    code = "InvalidArnException"


class InvalidAliasNameException(ClientError):
    code = "InvalidAliasNameException"


class InvalidCiphertextException(ClientError):
    code = "InvalidCiphertextException"


class IncorrectKeyException(ClientError):
    code = "IncorrectKeyException"


class InvalidKeyUsageException(ClientError):
    code = "InvalidKeyUsageException"


class InvalidGrantIdException(ClientError):
    code = "InvalidGrantIdException"


class InvalidGrantTokenException(ClientError):
    code = "InvalidGrantTokenException"


class InvalidMarkerException(ClientError):
    code = "InvalidMarkerException"


class LimitExceededException(ClientError):
    code = "LimitExceededException"


class MalformedPolicyDocumentException(ClientError):
    code = "MalformedPolicyDocumentException"


class TagException(ClientError):
    code = "TagException"


class UnsupportedOperationException(ClientError):
    code = "UnsupportedOperationException"


class DryRunOperationException(ClientError):
    code = "DryRunOperationException"


class CustomKeyStoreNotFoundException(ClientError):
    code = "CustomKeyStoreNotFoundException"


class CustomKeyStoreNameInUseException(ClientError):
    code = "CustomKeyStoreNameInUseException"


class CustomKeyStoreInvalidStateException(ClientError):
    code = "CustomKeyStoreInvalidStateException"


class CustomKeyStoreHasCMKsException(ClientError):
    code = "CustomKeyStoreHasCMKsException"


class CloudHsmClusterNotFoundException(ClientError):
    code = "CloudHsmClusterNotFoundException"


class CloudHsmClusterNotActiveException(ClientError):
    code = "CloudHsmClusterNotActiveException"


class CloudHsmClusterInUseException(ClientError):
    code = "CloudHsmClusterInUseException"


class CloudHsmClusterNotRelatedException(ClientError):
    code = "CloudHsmClusterNotRelatedException"


class CloudHsmClusterInvalidConfigurationException(ClientError):
    code = "CloudHsmClusterInvalidConfigurationException"


class IncorrectTrustAnchorException(ClientError):
    code = "IncorrectTrustAnchorException"


class ThrottlingException(ClientError):
    code = "ThrottlingException"


# --- authentication errors (common AWS errors, not in the KMS model) ----------------------------


class MissingAuthenticationTokenException(ClientError):
    code = "MissingAuthenticationTokenException"


class IncompleteSignatureException(ClientError):
    code = "IncompleteSignatureException"


class InvalidSignatureException(ClientError):
    code = "InvalidSignatureException"


class UnrecognizedClientException(ClientError):
    code = "UnrecognizedClientException"


class ExpiredTokenException(ClientError):
    """Temporary credentials used after their `Expiration` (KMS and STS both send this name)."""

    code = "ExpiredTokenException"


class InvalidClientTokenIdException(ClientError):
    """STS's name for an access key it does not know (KMS says UnrecognizedClientException)."""

    code = "InvalidClientTokenId"


class MalformedPolicyDocumentStsException(ClientError):
    """STS's name for a session policy that is not a valid policy document."""

    code = "MalformedPolicyDocument"


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


# --- CloudHSM v2 errors (the cloudhsmv2 model's shapes; the `cloudhsm` API on this endpoint) ----


class CloudHsmAccessDeniedException(ClientError):
    code = "CloudHsmAccessDeniedException"


class CloudHsmInvalidRequestException(ClientError):
    code = "CloudHsmInvalidRequestException"


class CloudHsmResourceNotFoundException(ClientError):
    code = "CloudHsmResourceNotFoundException"


class CloudHsmResourceLimitExceededException(ClientError):
    code = "CloudHsmResourceLimitExceededException"


class CloudHsmTagException(ClientError):
    code = "CloudHsmTagException"


class CloudHsmServiceException(ClientError):
    """The model flags no fault on it: a client error (HTTP 400), unlike InternalFailure."""

    code = "CloudHsmServiceException"


class CloudHsmInternalFailureException(KmsError):
    """The cloudhsmv2 model's one server fault (HTTP 500, retried by SDKs)."""

    code = "CloudHsmInternalFailureException"
    fault = True
