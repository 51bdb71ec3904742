"""Tampered ciphertext through the real service, on a fake HSM: every change is InvalidCiphertext.

The envelope's structure checks are unit-tested against vectors (tests/unit/test_envelope.py);
this proves the other half through the service: the GCM tag covers the IV, the body, the
encryption context and the key's ARN, and a failed tag check reaches the caller as
InvalidCiphertextException. That a real token's failed tag check (SoftHSM2: CKR_GENERAL_ERROR)
becomes the backend's BadCiphertextError, as the fake raises it, is tests/backend/test_contract.py.
"""

from __future__ import annotations

import pytest

from hsmbridge.errors import IncorrectKeyException, InvalidCiphertextException
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN


def test_tampering_is_invalid_ciphertext(fake_env) -> None:
    svc = fake_env.svc
    req = CreateKeyRequest(custom_key_store_id=fake_env.store_id, origin="AWS_CLOUDHSM")
    key, other = svc.keys.create(ADMIN, req).key_id, svc.keys.create(ADMIN, req).key_id
    blob = svc.crypto.encrypt(ADMIN, key, b"attack at dawn", context={"a": "bc"}).ciphertext_blob
    assert svc.crypto.decrypt(ADMIN, blob, context={"a": "bc"}).plaintext == b"attack at dawn"

    def flipped(i: int) -> bytes:
        out = bytearray(blob)
        out[i] ^= 0x80
        return bytes(out)

    other_id = bytes.fromhex(other.replace("-", ""))
    tampered = {
        "context that moto's encoding confuses": (blob, {"ab": "c"}),
        "no context": (blob, {}),
        "extra context pair": (blob, {"a": "bc", "x": "y"}),
        "version byte": (flipped(0), {"a": "bc"}),
        "unknown key id": (flipped(5), {"a": "bc"}),
        "another key's id": (blob[:1] + other_id + blob[17:], {"a": "bc"}),
        "IV length": (flipped(17), {"a": "bc"}),
        "IV": (flipped(20), {"a": "bc"}),
        "body": (flipped(31), {"a": "bc"}),
        "tag": (flipped(len(blob) - 1), {"a": "bc"}),
        "truncated tag": (blob[:-1], {"a": "bc"}),
        "appended byte": (blob + b"\x00", {"a": "bc"}),
        "empty": (b"", {}),
    }
    accepted = []
    for what, (data, context) in tampered.items():
        try:
            svc.crypto.decrypt(ADMIN, data, context=context)
        except InvalidCiphertextException:
            continue
        accepted.append(what)
    assert accepted == []
    with pytest.raises(IncorrectKeyException):
        svc.crypto.decrypt(ADMIN, blob, key_ref=other, context={"a": "bc"})
    # Nothing above disturbed the key or the login.
    assert svc.crypto.decrypt(ADMIN, blob, context={"a": "bc"}).plaintext == b"attack at dawn"
