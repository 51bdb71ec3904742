"""validate_input against botocore's KMS model: AWS message style, types, blobs, timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hsmbridge.errors import (
    SerializationException,
    UnknownOperationException,
    ValidationException,
)
from hsmbridge.protocol.validation import redacted_members, validate_input


def test_blobs_decoded_and_unknown_members_dropped():
    params = validate_input("Encrypt", {"KeyId": "k", "Plaintext": "aGk=", "Nope": 1})
    assert params == {"KeyId": "k", "Plaintext": b"hi"}


def test_timestamps_parsed():
    params = validate_input(
        "ImportKeyMaterial",
        {"KeyId": "k", "ImportToken": "AA==", "EncryptedKeyMaterial": "AA==", "ValidTo": 1.5e9},
    )
    assert params["ValidTo"] == datetime.fromtimestamp(1.5e9, UTC)


def test_missing_required_members_counted():
    with pytest.raises(ValidationException) as info:
        validate_input("Encrypt", {})
    assert info.value.message.startswith("2 validation errors detected: ")
    assert "Value null at 'keyId' failed to satisfy constraint: Member must not be null" in (
        info.value.message
    )
    assert "; " in info.value.message


def test_blob_limits_apply_to_decoded_length_and_hide_value():
    with pytest.raises(ValidationException) as info:
        validate_input("Encrypt", {"KeyId": "k", "Plaintext": ""})
    assert info.value.message == (
        "1 validation error detected: Value '***' at 'plaintext' failed to satisfy constraint:"
        " Member must have length greater than or equal to 1"
    )


def test_enum_and_nested_list_paths():
    with pytest.raises(ValidationException) as info:
        validate_input("CreateKey", {"KeyUsage": "NOPE", "Tags": [{"TagKey": "", "TagValue": "v"}]})
    message = info.value.message
    assert message.startswith("2 validation errors detected")
    assert "at 'keyUsage' failed to satisfy constraint: Member must satisfy enum value set: [" in (
        message
    )
    assert "at 'tags.1.member.tagKey'" in message


@pytest.mark.parametrize(
    "params",
    [
        {"KeyId": 5, "Plaintext": "aGk="},
        {"KeyId": "k", "Plaintext": "%%%"},
        {"KeyId": "k", "Plaintext": "aGk=", "EncryptionContext": []},
        {"KeyId": "k", "Plaintext": "aGk=", "DryRun": "true"},
        "not an object",
    ],
)
def test_type_errors_are_serialization_exceptions(params):
    with pytest.raises(SerializationException):
        validate_input("Encrypt", params)


def test_booleans_are_not_integers():
    with pytest.raises(SerializationException):
        validate_input("GenerateRandom", {"NumberOfBytes": True})


def test_unknown_operation():
    with pytest.raises(UnknownOperationException):
        validate_input("Frobnicate", {})


def test_redacted_members_from_model():
    assert "Plaintext" in redacted_members("Encrypt")
    assert {"KeyStorePassword", "XksProxyAuthenticationCredential"} <= redacted_members(
        "CreateCustomKeyStore"
    )
    assert "KeyId" not in redacted_members("Encrypt")
