"""Contract tests: the same behaviour from the in-memory fake and from a real SoftHSM2 token."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from hsmbridge.backend.errors import BadCiphertextError, DuplicateLabelError, KeyMissingError
from hsmbridge.backend.interface import HsmBackend, Sealed
from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.backend.templates import violations
from hsmbridge.config import ClusterBinding
from tests.fakes import FakeConnector


def _arn() -> str:
    return f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}"


@pytest.fixture(
    scope="module",
    params=["fake", pytest.param("softhsm", marks=pytest.mark.softhsm)],
)
def backend(request: pytest.FixtureRequest) -> Iterator[HsmBackend]:
    if request.param == "fake":
        be: HsmBackend = FakeConnector({"cluster-fake": "pw"}).connect("cluster-fake", "pw")
    else:
        env = request.getfixturevalue("softhsm_env")
        label, pin = env.stock.pop(0)
        binding = ClusterBinding("cluster-contract", replace(env.profile, token_label=label))
        be = Pkcs11Connector({"cluster-contract": binding}).connect("cluster-contract", pin)
    yield be
    be.close()


def test_generate_find_list_destroy(backend: HsmBackend) -> None:
    label, key_id = _arn(), uuid.uuid4().bytes
    info = backend.generate_key(label, key_id)
    assert (info.label, info.key_id) == (label, key_id)
    assert violations(info) == []
    assert [k.label for k in backend.find_keys(label)] == [label]
    assert label in {k.label for k in backend.list_keys()}
    assert backend.destroy_key(label) == 1
    assert backend.find_keys(label) == []
    assert label not in {k.label for k in backend.list_keys()}
    assert backend.destroy_key(label) == 0


def test_destroy_by_handle_only_touches_that_handle(backend: HsmBackend) -> None:
    label = _arn()
    info = backend.generate_key(label, b"id")
    assert backend.destroy_key(label, handle=info.handle + 100_000) == 0
    assert backend.destroy_key(label, handle=info.handle) == 1


@pytest.mark.parametrize("plaintext", [b"", b"x", bytes(range(256)) * 16])
@pytest.mark.parametrize("aad", [b"", b"context"])
def test_encrypt_decrypt_round_trip(backend: HsmBackend, plaintext: bytes, aad: bytes) -> None:
    label = _arn()
    backend.generate_key(label, b"k")
    sealed = backend.encrypt(label, plaintext, aad)
    assert len(sealed.iv) == 12
    assert len(sealed.ciphertext) == len(plaintext) + 16
    assert backend.decrypt(label, sealed, aad) == plaintext
    assert backend.encrypt(label, plaintext, aad) != sealed  # fresh IV each time


def test_duplicate_label_is_refused(backend: HsmBackend) -> None:
    label = _arn()
    backend.generate_key(label, b"one")
    with pytest.raises(DuplicateLabelError):
        backend.generate_key(label, b"two")
    assert len(backend.find_keys(label)) == 1


def test_tampered_ciphertext_and_wrong_aad_are_bad_ciphertext(backend: HsmBackend) -> None:
    label = _arn()
    backend.generate_key(label, b"k")
    sealed = backend.encrypt(label, b"secret data", b"aad")
    flipped = bytearray(sealed.ciphertext)
    flipped[-1] ^= 1
    with pytest.raises(BadCiphertextError):
        backend.decrypt(label, Sealed(sealed.iv, bytes(flipped)), b"aad")
    with pytest.raises(BadCiphertextError):
        backend.decrypt(label, sealed, b"other aad")
    with pytest.raises(BadCiphertextError):
        backend.decrypt(label, Sealed(bytes(12), sealed.ciphertext), b"aad")
    with pytest.raises(BadCiphertextError):
        backend.decrypt(label, Sealed(sealed.iv, sealed.ciphertext[:10]), b"aad")
    # The failures leave the connection usable.
    assert backend.decrypt(label, sealed, b"aad") == b"secret data"


def test_wrong_key_is_bad_ciphertext(backend: HsmBackend) -> None:
    a, b = _arn(), _arn()
    backend.generate_key(a, b"a")
    backend.generate_key(b, b"b")
    with pytest.raises(BadCiphertextError):
        backend.decrypt(b, backend.encrypt(a, b"data", b""), b"")


def test_missing_key(backend: HsmBackend) -> None:
    label = _arn()
    with pytest.raises(KeyMissingError):
        backend.encrypt(label, b"data", b"")
    with pytest.raises(KeyMissingError):
        backend.decrypt(label, Sealed(bytes(12), bytes(32)), b"")
    assert backend.find_keys(label) == []


def test_key_destroyed_after_use_is_missing(backend: HsmBackend) -> None:
    label = _arn()
    backend.generate_key(label, b"k")
    sealed = backend.encrypt(label, b"data", b"")  # caches the handle on the real backend
    backend.destroy_key(label)
    with pytest.raises(KeyMissingError):
        backend.decrypt(label, sealed, b"")


@pytest.mark.parametrize("n", [0, 1, 16, 32, 1000])
def test_random(backend: HsmBackend, n: int) -> None:
    data = backend.random(n)
    assert len(data) == n
    if n >= 16:
        assert data != backend.random(n)


def test_ping(backend: HsmBackend) -> None:
    health = backend.ping()
    assert health.ok
    assert health.latency_ms >= 0
