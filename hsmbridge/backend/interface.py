"""The HSM seam: what the rest of hsmbridge may ask of a logged-in PKCS#11 token, in domain terms.

Owns: the `HsmBackend` Protocol, the `HsmConnector` Protocol that logs in and returns one, and the
plain value types that cross the seam. No `pkcs11` type crosses it. Implemented for real by
`hsmbridge.backend.pkcs11`; a fake for pure-logic tests lives in `tests/fakes.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class HsmKeyInfo:
    """One secret-key object on the token, with the attributes an audit or invariant check needs.

    `handle` is process-local and only valid until the next logout or re-initialisation.
    Attributes the token refused to reveal are None.
    """

    handle: int
    label: str
    key_id: bytes
    key_type: str | None  # "AES", "GENERIC_SECRET", ...
    value_len: int | None  # bytes
    token: bool | None
    private: bool | None
    sensitive: bool | None
    extractable: bool | None
    always_sensitive: bool | None
    never_extractable: bool | None
    local: bool | None
    encrypt: bool | None
    decrypt: bool | None
    wrap: bool | None
    unwrap: bool | None
    sign: bool | None
    verify: bool | None
    derive: bool | None


@dataclass(frozen=True)
class Sealed:
    """AES-GCM output: the IV actually used (the HSM's own on CloudHSM) and ciphertext || tag."""

    iv: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class HsmHealth:
    ok: bool
    latency_ms: float
    detail: str


class HsmBackend(Protocol):
    """A logged-in connection to one token (one cluster). Thread-safe; methods may block.

    Every method raises only `hsmbridge.backend.errors.BackendError` subclasses.
    """

    def generate_key(self, label: str, key_id: bytes, *, fresh_label: bool = False) -> HsmKeyInfo:
        """Create the persistent, non-extractable AES-256 key; verify its attributes or destroy it.

        Raises DuplicateLabelError if a key with this label already exists. `fresh_label=True`
        is the caller's promise that the label was just minted with enough randomness that no
        key can carry it (a KMS key ARN with a new UUID4): the backend may then skip the search,
        which is a linear scan on some HSMs (SoftHSM2: ~14 us per object on the token).
        """
        ...

    def find_keys(self, label: str) -> list[HsmKeyInfo]:
        """Every secret key carrying exactly this label (normally zero or one)."""
        ...

    def list_keys(self) -> Iterator[HsmKeyInfo]:
        """Every secret-key object the user can see, with attributes, in one batched scan."""
        ...

    def destroy_key(self, label: str, handle: int | None = None) -> int:
        """Destroy the key with this label (and, if given, this handle); return how many went."""
        ...

    def destroy_incomplete_keys(self) -> int:
        """Destroy key objects an interrupted key generation left without label, id or value, on
        HSMs whose profile says they can exist (`incomplete_key_objects`); return how many."""
        ...

    def encrypt(self, label: str, plaintext: bytes, aad: bytes) -> Sealed: ...

    def decrypt(self, label: str, sealed: Sealed, aad: bytes) -> bytes:
        """Raises BadCiphertextError when the tag does not verify."""
        ...

    def random(self, n_bytes: int) -> bytes: ...

    def ping(self) -> HsmHealth:
        """A real, cheap HSM round trip (random bytes); never raises."""
        ...

    def close(self) -> None:
        """Log out and release every session. Idempotent."""
        ...


class HsmConnector(Protocol):
    """Logs in as the crypto user to the token behind one cluster and returns a backend."""

    def connect(self, cluster_id: str, password: str) -> HsmBackend:
        """Raises LoginError (with a reason), HsmUnreachableError or MisconfiguredError."""
        ...

    def change_password(self, cluster_id: str, old: str, new: str) -> None:
        """Change the crypto user's password in the cluster, as the cluster's profile says (a
        no-op when it does not rotate); raises LoginError (with a reason) or BackendError."""
        ...
