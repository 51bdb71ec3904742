"""In-memory stand-ins for the HSM seam, for tests of everything above the backend.

`FakeBackend` implements `HsmBackend` with `cryptography`'s AES-GCM, including duplicate-label
refusal and BadCiphertextError; `FakeConnector` implements `HsmConnector`. Keys of one cluster
live in a shared `FakeToken`, so reconnecting sees the same keys, as with a real HSM.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmbridge.backend.errors import (
    BadCiphertextError,
    DuplicateLabelError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
)
from hsmbridge.backend.interface import HsmHealth, HsmKeyInfo, Sealed
from hsmbridge.model import ConnectionErrorCode


@dataclass
class _FakeKey:
    handle: int
    label: str
    key_id: bytes
    material: bytes

    def info(self) -> HsmKeyInfo:
        return HsmKeyInfo(
            handle=self.handle, label=self.label, key_id=self.key_id, key_type="AES",
            value_len=len(self.material), token=True, private=True, sensitive=True,
            extractable=False, always_sensitive=True, never_extractable=True, local=True,
            encrypt=True, decrypt=True, wrap=False, unwrap=False, sign=False, verify=False,
            derive=False,
        )  # fmt: skip


@dataclass
class FakeToken:
    """The keys of one fake cluster; shared by every backend connected to it."""

    keys: dict[int, _FakeKey] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    handles: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class FakeBackend:
    """HsmBackend in memory. Thread-safe."""

    def __init__(self, token: FakeToken | None = None) -> None:
        self.token = token or FakeToken()
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:
            raise HsmUnreachableError("this fake HSM connection is closed")

    def _one(self, label: str) -> _FakeKey:
        found = [k for k in self.token.keys.values() if k.label == label]
        if not found:
            raise KeyMissingError(f"no key labelled {label!r}")
        if len(found) > 1:
            raise DuplicateLabelError(f"{len(found)} keys labelled {label!r}")
        return found[0]

    def generate_key(self, label: str, key_id: bytes, *, fresh_label: bool = False) -> HsmKeyInfo:
        with self.token.lock:
            self._check_open()
            # The fake searches even for fresh labels: a dict scan is free, and tests see a
            # duplicate whatever the caller promised.
            if any(k.label == label for k in self.token.keys.values()):
                raise DuplicateLabelError(f"a key labelled {label!r} already exists")
            key = _FakeKey(next(self.token.handles), label, key_id, AESGCM.generate_key(256))
            self.token.keys[key.handle] = key
            return key.info()

    def find_keys(self, label: str) -> list[HsmKeyInfo]:
        with self.token.lock:
            self._check_open()
            return [k.info() for k in self.token.keys.values() if k.label == label]

    def list_keys(self) -> Iterator[HsmKeyInfo]:
        with self.token.lock:
            self._check_open()
            return iter([k.info() for k in self.token.keys.values()])

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        with self.token.lock:
            self._check_open()
            doomed = [
                h for h, k in self.token.keys.items()
                if k.label == label and (handle is None or h == handle)
            ]  # fmt: skip
            for h in doomed:
                del self.token.keys[h]
            return len(doomed)

    def destroy_incomplete_keys(self) -> int:
        return 0  # the fake creates a key in one step: nothing is ever left half-written

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Sealed:
        with self.token.lock:
            self._check_open()
            key = self._one(label)
        iv = os.urandom(12)
        return Sealed(iv=iv, ciphertext=AESGCM(key.material).encrypt(iv, plaintext, aad))

    def decrypt(self, label: str, sealed: Sealed, aad: bytes) -> bytes:
        with self.token.lock:
            self._check_open()
            key = self._one(label)
        if len(sealed.iv) != 12 or len(sealed.ciphertext) < 16:
            raise BadCiphertextError("ciphertext or IV has the wrong length for AES-GCM")
        try:
            return AESGCM(key.material).decrypt(sealed.iv, sealed.ciphertext, aad)
        except InvalidTag:
            raise BadCiphertextError("AES-GCM authentication failed") from None

    def random(self, n_bytes: int) -> bytes:
        self._check_open()
        return os.urandom(n_bytes)

    def ping(self) -> HsmHealth:
        start = time.perf_counter()
        ok = not self.closed
        return HsmHealth(ok, (time.perf_counter() - start) * 1000, "fake" if ok else "closed")

    def close(self) -> None:
        self.closed = True


class FakeConnector:
    """HsmConnector over FakeTokens: one per cluster id that has a password."""

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = dict(passwords)
        self.tokens: dict[str, FakeToken] = {cid: FakeToken() for cid in passwords}
        self.connects = 0

    def connect(self, cluster_id: str, password: str) -> FakeBackend:
        if cluster_id not in self.passwords:
            raise HsmUnreachableError(f"no HSM is configured for cluster {cluster_id!r}")
        if password != self.passwords[cluster_id]:
            raise LoginError(ConnectionErrorCode.INVALID_CREDENTIALS, "wrong password for kmsuser")
        self.connects += 1
        return FakeBackend(self.tokens[cluster_id])
