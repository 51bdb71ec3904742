"""Test-only fault injection at two depths of the HSM stack.

* `FaultyConnector` / `FaultyBackend` wrap an `HsmConnector` / `HsmBackend` and raise the
  backend's own error vocabulary (busy, session lost, device lost, unreachable) before or after
  the real call, so the service sees the failure modes of every backend method, including "the HSM
  did it but the answer was lost".
* `FaultyLibrary` sits *under* hsmbridge's backend: it replaces the python-pkcs11 `lib` object of
  the process's `Library` and hands out proxies of Token, Session and Key objects whose methods
  raise real `pkcs11.exceptions` classes with probability `rate`. The backend's translation table,
  tenacity retries, session eviction, re-login and re-initialisation then run for real against
  SoftHSM. `install_library_faults()` swaps it in for one token label and restores it afterwards.

No production module is patched by import path: the library object is the seam the backend itself
keeps (`Library.raw`), and the connector/backend wrappers implement the Protocols.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pkcs11 import exceptions as p11e

from hsmbridge.backend.errors import (
    DeviceLostError,
    HsmUnreachableError,
    TransientHsmError,
)
from hsmbridge.backend.pkcs11_errors import HsmBusyError, SessionLostError
from hsmbridge.backend.sessions import Library, load_library

# What a CloudHSM or SoftHSM really raises when throttled, failing over or losing its device
# , as python-pkcs11 exception classes.
PKCS11_FAULTS: tuple[type[Exception], ...] = (
    p11e.DeviceError,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
    p11e.FunctionFailed,
    p11e.OperationActive,
)
BACKEND_FAULTS: tuple[type[Exception], ...] = (
    HsmBusyError,
    SessionLostError,
    TransientHsmError,
    DeviceLostError,
    HsmUnreachableError,
)


class Injector:
    """Decides, thread-safely and reproducibly, whether the next call fails and with what."""

    def __init__(self, seed: int, rate: float, errors: tuple[type[Exception], ...]) -> None:
        self.rate = rate
        self.errors = errors
        self.enabled = False
        self.injected: Counter[str] = Counter()
        self.calls = 0
        self.queue: list[type[Exception]] = []  # forced failures, taken before random ones
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def pick(self) -> type[Exception] | None:
        with self._lock:
            if not self.enabled:
                return None
            self.calls += 1
            if self.queue:
                exc = self.queue.pop(0)
            elif self._rng.random() < self.rate:
                exc = self._rng.choice(self.errors)
            else:
                return None
            self.injected[exc.__name__] += 1
            return exc

    def maybe_fail(self, where: str) -> None:
        exc = self.pick()
        if exc is not None:
            raise exc(f"injected at {where}")

    def coin(self) -> bool:
        with self._lock:
            return self._rng.random() < 0.5


# --- backend level ------------------------------------------------------------------------------


class FaultyBackend:
    """An HsmBackend whose calls fail before or after the real call (the answer lost)."""

    def __init__(self, inner: Any, injector: Injector) -> None:
        self.inner = inner
        self._inj = injector

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        exc = self._inj.pick()
        if exc is not None and self._inj.coin():
            raise exc(f"injected before {name}")
        result = getattr(self.inner, name)(*args, **kwargs)
        if exc is not None:
            raise exc(f"injected after {name}")
        return result

    def generate_key(self, label: str, key_id: bytes, **kwargs: Any) -> Any:
        return self._call("generate_key", label, key_id, **kwargs)

    def find_keys(self, label: str) -> Any:
        return self._call("find_keys", label)

    def destroy_key(self, label: str, handle: int | None = None) -> Any:
        return self._call("destroy_key", label, handle)

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Any:
        return self._call("encrypt", label, plaintext, aad)

    def decrypt(self, label: str, sealed: Any, aad: bytes) -> Any:
        return self._call("decrypt", label, sealed, aad)

    def random(self, n_bytes: int) -> Any:
        return self._call("random", n_bytes)

    def list_keys(self) -> Any:
        return self.inner.list_keys()  # the audit's own view stays fault-free

    def ping(self) -> Any:
        return self.inner.ping()

    def close(self) -> None:
        self.inner.close()

    @property
    def stats(self) -> Any:
        return self.inner.stats


class FaultyConnector:
    def __init__(self, inner: Any, injector: Injector) -> None:
        self.inner = inner
        self.injector = injector
        self.backends: list[FaultyBackend] = []

    def connect(self, cluster_id: str, password: str) -> FaultyBackend:
        backend = FaultyBackend(self.inner.connect(cluster_id, password), self.injector)
        self.backends.append(backend)
        return backend

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        self.inner.change_password(cluster_id, old, new)


# --- python-pkcs11 level ------------------------------------------------------------------------


class _Proxy:
    def __init__(self, inner: Any, injector: Injector) -> None:
        self._inner = inner
        self._inj = injector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyKey(_Proxy):
    def encrypt(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_Encrypt")
        return self._inner.encrypt(*args, **kwargs)

    def decrypt(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_Decrypt")
        return self._inner.decrypt(*args, **kwargs)

    def get_attributes(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_GetAttributeValue")
        return self._inner.get_attributes(*args, **kwargs)

    def destroy(self) -> Any:
        self._inj.maybe_fail("C_DestroyObject")
        return self._inner.destroy()

    def __getitem__(self, key: Any) -> Any:
        return self._inner[key]


class FaultySession(_Proxy):
    def __init__(self, inner: Any, injector: Injector, token: FaultyToken) -> None:
        super().__init__(inner, injector)
        self.token = token  # worker sessions are opened from `login.token`: keep them proxied

    def get_key(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_FindObjects")
        return FaultyKey(self._inner.get_key(*args, **kwargs), self._inj)

    def get_objects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._inj.maybe_fail("C_FindObjectsInit")
        return iter([FaultyKey(obj, self._inj) for obj in self._inner.get_objects(*args, **kwargs)])

    def generate_key(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_GenerateKey")
        key = self._inner.generate_key(*args, **kwargs)
        # The key exists now; a failure here is "created, but the answer was lost".
        self._inj.maybe_fail("C_GenerateKey (after)")
        return FaultyKey(key, self._inj)

    def generate_random(self, *args: Any, **kwargs: Any) -> Any:
        self._inj.maybe_fail("C_GenerateRandom")
        return self._inner.generate_random(*args, **kwargs)

    def close(self) -> Any:
        return self._inner.close()


class FaultyToken(_Proxy):
    def open(self, *args: Any, **kwargs: Any) -> FaultySession:
        self._inj.maybe_fail("C_OpenSession")
        return FaultySession(self._inner.open(*args, **kwargs), self._inj, self)


class FaultyLibrary(_Proxy):
    """python-pkcs11's `lib`, with the tokens labelled `token_label` proxied."""

    def __init__(self, inner: Any, injector: Injector, token_label: str) -> None:
        super().__init__(inner, injector)
        self._label = token_label

    def get_token(self, *args: Any, **kwargs: Any) -> Any:
        token = self._inner.get_token(*args, **kwargs)
        if kwargs.get("token_label") == self._label:
            return FaultyToken(token, self._inj)
        return token

    def get_slots(self, *args: Any, **kwargs: Any) -> list[FaultySlot]:
        """hsmbridge walks the slots itself to find its token (sessions._find_token)."""
        return [
            FaultySlot(slot, self._inj, self._label)
            for slot in self._inner.get_slots(*args, **kwargs)
        ]


class FaultySlot(_Proxy):
    def __init__(self, inner: Any, injector: Injector, token_label: str) -> None:
        super().__init__(inner, injector)
        self._label = token_label

    def get_token(self) -> Any:
        token = self._inner.get_token()
        return FaultyToken(token, self._inj) if token.label == self._label else token


@contextmanager
def install_library_faults(
    module_path: str, token_label: str, injector: Injector
) -> Iterator[Library]:
    """Route one token's PKCS#11 objects through FaultyLibrary for the duration of the block.

    WARNING: `Library` is process-wide; only tokens with this label are proxied, and the real
    `lib` is put back even if the block fails.
    """
    library = load_library(module_path)
    real = library.raw
    library.raw = FaultyLibrary(real, injector, token_label)
    try:
        yield library
    finally:
        library.raw = real
