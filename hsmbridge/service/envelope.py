"""The ciphertext blob format and the canonical encryption-context AAD (pure, vector-tested).

Owns: how a `CiphertextBlob` is laid out and how the encryption context and key identity are
bound into AES-GCM as additional authenticated data. Must not import backend, metadata or api.

Blob, version 1::

    0x01 | key id (16 bytes, the UUID) | IV length (1 byte) | IV | ciphertext || 16-byte tag

AAD, version 1::

    b"hsmbridge:v1\\0" | lp(key ARN) | u32(len(context)) | for each (k, v) sorted by k: lp(k) lp(v)

where lp(x) is a 4-byte big-endian length followed by the UTF-8 bytes. Length prefixes make the
encoding injective: {"a": "bc"} and {"ab": "c"} give different AAD (moto's concatenation does not).
Binding the key ARN reproduces "ciphertext only decrypts under the KMS key that made it", even if
two keys' material were ever equal (e.g. restored from a backup into another store).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from hsmbridge.errors import InvalidCiphertextException

VERSION = 1
TAG_BYTES = 16
_AAD_DOMAIN = b"hsmbridge:v1\x00"
_MIN_BLOB = 1 + 16 + 1 + TAG_BYTES


@dataclass(frozen=True)
class Envelope:
    key_id: str
    iv: bytes
    ciphertext: bytes  # includes the GCM tag


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The injective encoding of an encryption context; pair order does not matter."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    return struct.pack(">I", len(items)) + b"".join(_lp(k) + _lp(v) for k, v in items)


def aad_for(key_arn: str, context: Mapping[str, str]) -> bytes:
    return _AAD_DOMAIN + _lp(key_arn.encode("utf-8")) + canonical_context(context)


def pack(envelope: Envelope) -> bytes:
    if not 1 <= len(envelope.iv) <= 255:
        raise ValueError("IV length must be 1-255 bytes")
    return (
        bytes([VERSION])
        + uuid.UUID(envelope.key_id).bytes
        + bytes([len(envelope.iv)])
        + envelope.iv
        + envelope.ciphertext
    )


def unpack(blob: bytes) -> Envelope:
    """Parse a blob; anything that is not a version-1 blob is InvalidCiphertextException."""
    if len(blob) < _MIN_BLOB or blob[0] != VERSION:
        raise InvalidCiphertextException(
            "The ciphertext is not a ciphertext blob produced by this service, or it is corrupt."
        )
    key_id = str(uuid.UUID(bytes=blob[1:17]))
    iv_len = blob[17]
    body = blob[18 + iv_len :]
    if iv_len == 0 or len(body) < TAG_BYTES:
        raise InvalidCiphertextException("The ciphertext blob is truncated or corrupt.")
    return Envelope(key_id=key_id, iv=blob[18 : 18 + iv_len], ciphertext=body)
