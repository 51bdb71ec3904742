"""The ciphertext blob and the encryption-context AAD, against known-answer vectors.

tests/vectors/envelope.json was built independently of `envelope.py` (struct + cryptography's
AESGCM), so these tests catch a change of the byte layout, not just a round-trip failure: a blob
format change would make every stored ciphertext undecryptable.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmbridge.errors import InvalidCiphertextException
from hsmbridge.service.envelope import Envelope, aad_for, canonical_context, pack, unpack

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "envelope.json").read_text())
ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def _ids(cases: list[dict]) -> list[str]:
    return [c["name"] for c in cases]


@pytest.mark.parametrize("case", VECTORS["aad"], ids=_ids(VECTORS["aad"]))
def test_aad_known_answers(case: dict) -> None:
    assert aad_for(case["key_arn"], case["context"]).hex() == case["aad_hex"]


@pytest.mark.parametrize("case", VECTORS["pack"], ids=_ids(VECTORS["pack"]))
def test_pack_and_unpack_known_answers(case: dict) -> None:
    env = Envelope(
        case["key_id"], bytes.fromhex(case["iv_hex"]), bytes.fromhex(case["ciphertext_hex"])
    )
    assert pack(env).hex() == case["blob_hex"]
    assert unpack(bytes.fromhex(case["blob_hex"])) == env


@pytest.mark.parametrize("case", VECTORS["gcm"], ids=_ids(VECTORS["gcm"]))
def test_blob_decrypts_with_plain_aes_gcm(case: dict) -> None:
    env = unpack(bytes.fromhex(case["blob_hex"]))
    assert case["key_arn"].endswith(env.key_id)
    aad = aad_for(case["key_arn"], case["context"])
    key = AESGCM(bytes.fromhex(case["aes_key_hex"]))
    assert key.decrypt(env.iv, env.ciphertext, aad).hex() == case["plaintext_hex"]


@pytest.mark.parametrize("case", VECTORS["bad_blobs"], ids=_ids(VECTORS["bad_blobs"]))
def test_malformed_blobs_are_invalid_ciphertext(case: dict) -> None:
    with pytest.raises(InvalidCiphertextException):
        unpack(bytes.fromhex(case["blob_hex"]))


def test_every_truncation_is_rejected_or_fails_authentication() -> None:
    case = VECTORS["gcm"][0]
    blob = bytes.fromhex(case["blob_hex"])
    key, aad = AESGCM(bytes.fromhex(case["aes_key_hex"])), aad_for(ARN, case["context"])
    for n in range(len(blob)):
        try:
            env = unpack(blob[:n])
        except InvalidCiphertextException:
            continue
        with pytest.raises(InvalidTag):  # a shorter body cannot verify
            key.decrypt(env.iv, env.ciphertext, aad)


def test_every_single_bit_flip_is_caught() -> None:
    """Structure errors are caught by unpack; everything else by the GCM tag or the key id."""
    case = VECTORS["gcm"][1]
    blob = bytes.fromhex(case["blob_hex"])
    key, aad = AESGCM(bytes.fromhex(case["aes_key_hex"])), aad_for(ARN, case["context"])
    original = unpack(blob)
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x01
        try:
            env = unpack(bytes(flipped))
        except InvalidCiphertextException:
            continue
        if env.key_id != original.key_id:
            continue  # names another key: the service answers InvalidCiphertext for it
        with pytest.raises(InvalidTag):
            key.decrypt(env.iv, env.ciphertext, aad)


def test_context_encoding_is_injective_where_concatenation_is_not() -> None:
    # STYLE A4: moto's sorted concatenation makes these two equal; length prefixes must not.
    assert canonical_context({"a": "bc"}) != canonical_context({"ab": "c"})
    assert canonical_context({"a": "b", "c": "d"}) != canonical_context({"a": "bcd"})
    assert canonical_context({}) != canonical_context({"": ""})
    assert aad_for(ARN, {}) != aad_for(ARN[:-1] + "c", {})  # the key is bound too
    # Exhaustive over small alphabets: distinct contexts never share an encoding.
    words = ["", "a", "b", "ab", "ba", "\x00", "a\x00"]
    seen: dict[bytes, dict[str, str]] = {}
    for n in range(3):
        for keys in itertools.combinations(words, n):
            for values in itertools.product(words, repeat=n):
                ctx = dict(zip(keys, values, strict=True))
                encoded = canonical_context(ctx)
                assert seen.setdefault(encoded, ctx) == ctx


def test_context_encoding_ignores_pair_order() -> None:
    pairs = [("tenant", "42"), ("purpose", "test"), ("é", "1"), ("Z", ""), ("a", "b")]
    expected = canonical_context(dict(pairs))
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(pairs)
        assert canonical_context(dict(pairs)) == expected


def test_pack_refuses_impossible_iv_lengths() -> None:
    key_id = "1234abcd-12ab-34cd-56ef-1234567890ab"
    for iv in (b"", bytes(256)):
        with pytest.raises(ValueError, match="IV length"):
            pack(Envelope(key_id, iv, bytes(16)))
