"""The backend on the event loop (`hsmbridge.nowait`), on a real SoftHSM2 token: a call made in an
inline attempt either completes at once or refuses with WouldBlock before it reaches the HSM,
and the same call outside the attempt (its rerun on a worker thread) waits and recovers as
before."""

from __future__ import annotations

import contextvars
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from hsmbridge import nowait
from hsmbridge.backend.errors import BadCiphertextError
from hsmbridge.backend.interface import Sealed
from hsmbridge.backend.pkcs11 import Pkcs11Backend, Pkcs11Connector
from hsmbridge.config import ClusterBinding
from tests.cloudhsm_shim import softhsm2_only
from tests.held_lock import HeldLock

pytestmark = [pytest.mark.softhsm, softhsm2_only]

T = TypeVar("T")
AAD = b"aad"


def _inline(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` as the HTTP edge runs a request inline: in a context of its own."""
    return contextvars.copy_context().run(nowait.attempt, fn, *args)


def _connect(binding: ClusterBinding, password: str) -> Pkcs11Backend:
    return Pkcs11Connector({binding.cluster_id: binding}).connect(binding.cluster_id, password)


@pytest.fixture
def backend(softhsm_token: Any) -> Iterator[Pkcs11Backend]:
    be = _connect(*softhsm_token())
    yield be
    be.close()


def _new_key(backend: Pkcs11Backend) -> str:
    label = f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}"
    backend.generate_key(label, uuid.uuid4().bytes)
    backend.encrypt(label, b"warm", AAD)  # in the cache of the session an inline call reuses
    return label


def _held(backend: Pkcs11Backend) -> HeldLock:
    """The library lock held by another thread until the block ends."""
    return HeldLock(backend._pool.library.lock)


def test_a_cached_key_encrypts_decrypts_and_draws_random_inline(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    hits = backend.stats.handle_cache_hits
    sealed = _inline(backend.encrypt, label, b"inline", AAD)
    assert _inline(backend.decrypt, label, sealed, AAD) == b"inline"
    assert backend.decrypt(label, sealed, AAD) == b"inline"  # and on a thread, the same answer
    assert len(_inline(backend.random, 32)) == 32
    assert backend.stats.handle_cache_hits == hits + 3


def test_a_tampered_ciphertext_is_answered_inline(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    sealed = backend.encrypt(label, b"inline", AAD)
    tampered = Sealed(sealed.iv, sealed.ciphertext[:-1] + bytes([sealed.ciphertext[-1] ^ 1]))
    with pytest.raises(BadCiphertextError):
        _inline(backend.decrypt, label, tampered, AAD)
    assert _inline(backend.decrypt, label, sealed, AAD) == b"inline"  # the session is fine


def test_the_library_lock_held_elsewhere_refuses_without_waiting(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    with _held(backend) as held:
        with pytest.raises(nowait.WouldBlock, match="library lock"):
            _inline(backend.encrypt, label, b"x", AAD)
        assert not held.release.is_set()  # refused while the lock was still held
    assert _inline(backend.decrypt, label, backend.encrypt(label, b"x", AAD), AAD) == b"x"


def test_the_rerun_in_the_same_context_waits_for_the_lock(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    ctx = contextvars.copy_context()
    with _held(backend) as held:
        with pytest.raises(nowait.WouldBlock):
            ctx.run(nowait.attempt, backend.encrypt, label, b"x", AAD)
        threading.Timer(0.2, held.release.set).start()
        sealed = ctx.run(backend.encrypt, label, b"x", AAD)  # the attempt is over: it waits
    assert backend.decrypt(label, sealed, AAD) == b"x"


def test_a_key_not_in_the_session_cache_is_left_to_a_thread(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    backend._pool.forget(label)  # as after a restart: the lookup would scan the token
    misses = backend.stats.handle_cache_misses
    with pytest.raises(nowait.WouldBlock, match="by label"):
        _inline(backend.encrypt, label, b"x", AAD)
    sealed = backend.encrypt(label, b"x", AAD)  # the rerun finds it and caches it
    assert _inline(backend.decrypt, label, sealed, AAD) == b"x"
    assert backend.stats.handle_cache_misses == misses + 2


def test_after_a_reinitialisation_only_a_thread_logs_in_again(backend: Pkcs11Backend) -> None:
    label = _new_key(backend)
    library = backend._pool.library
    library.reinitialize(library.generation)
    with pytest.raises(nowait.WouldBlock, match="re-initialised"):
        _inline(backend.encrypt, label, b"x", AAD)
    sealed = backend.encrypt(label, b"x", AAD)  # logs in again, finds the key again
    assert _inline(backend.decrypt, label, sealed, AAD) == b"x"


def test_a_profile_without_inline_calls_is_always_left_to_a_thread(softhsm_token: Any) -> None:
    binding, password = softhsm_token()
    binding = replace(binding, profile=replace(binding.profile, inline_calls=False))
    backend = _connect(binding, password)
    try:
        label = _new_key(backend)
        with pytest.raises(nowait.WouldBlock, match="not made inline"):
            _inline(backend.encrypt, label, b"x", AAD)
        assert backend.decrypt(label, backend.encrypt(label, b"x", AAD), AAD) == b"x"
    finally:
        backend.close()
