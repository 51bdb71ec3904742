"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateRandom (spec §7).

Owns: key-state checks for cryptography (spec §6.2), the algorithm and size rules, DryRun, and
turning HSM AES-GCM results into versioned ciphertext blobs via `envelope`. Plaintext and data
keys never leave this module except in the response. Must not import api or cli.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from hsmbridge.backend import BackendError, HsmBackend, Sealed
from hsmbridge.errors import (
    CustomKeyStoreInvalidStateException,
    DependencyTimeoutException,
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSInvalidStateException,
    NotFoundException,
    ValidationException,
)
from hsmbridge.keystore.lifecycle import StoreOp, require
from hsmbridge.model import KeyRecord, KeyState
from hsmbridge.service import envelope
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm_errors import to_kms_error
from hsmbridge.service.keys import KeyService
from hsmbridge.service.lookup import KeyLookup, effective_state

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."
Context = Mapping[str, str]


@dataclass(frozen=True)
class Encrypted:
    ciphertext_blob: bytes
    key_arn: str


@dataclass(frozen=True)
class Decrypted:
    plaintext: bytes
    key_arn: str


@dataclass(frozen=True)
class DataKey:
    ciphertext_blob: bytes
    plaintext: bytes
    key_arn: str


@dataclass(frozen=True)
class ReEncrypted:
    ciphertext_blob: bytes
    source_key_arn: str
    key_arn: str


class CryptoService:
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup, keys: KeyService) -> None:
        self._ctx = ctx
        self._lookup = lookup
        self._keys = keys

    # -- helpers ------------------------------------------------------------------------------
    def _usable(self, record: KeyRecord) -> HsmBackend:
        """The backend for a key that may be used for cryptography right now."""
        row = self._lookup.store_of(record)  # read once: state check and login both use it
        state = effective_state(record, row)
        if state is KeyState.DISABLED:
            raise DisabledException(f"{record.arn} is disabled.")
        if state is KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{record.arn} is pending deletion.")
        if state is KeyState.UNAVAILABLE:
            raise KMSInvalidStateException(f"{record.arn} is unavailable.")
        self._ctx.clusters.require_active_hsm(record.cluster_id, record.arn)
        return self._keys.backend_for(record, row)

    def _seal(self, record: KeyRecord, backend: HsmBackend, data: bytes, ctx: Context) -> bytes:
        try:
            sealed = backend.encrypt(record.arn, data, envelope.aad_for(record.arn, ctx))
        except BackendError as exc:
            raise to_kms_error(exc, record.arn) from exc
        return envelope.pack(envelope.Envelope(record.key_id, sealed.iv, sealed.ciphertext))

    def _open(self, blob: bytes, key_ref: str | None, ctx: Context, dry_run: bool) -> Decrypted:
        env = envelope.unpack(blob)
        record = self._record_for_blob(env.key_id)
        if key_ref is not None:
            named = self._lookup.resolve(key_ref, allow_alias=True)
            if named.key_id != record.key_id:
                raise IncorrectKeyException(
                    "The key ID in the request does not identify the KMS key that encrypted the "
                    "ciphertext."
                )
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        try:
            plaintext = backend.decrypt(
                record.arn, Sealed(env.iv, env.ciphertext), envelope.aad_for(record.arn, ctx)
            )
        except BackendError as exc:
            raise to_kms_error(exc, record.arn) from exc
        return Decrypted(plaintext, record.arn)

    def _record_for_blob(self, key_id: str) -> KeyRecord:
        try:
            return self._lookup.resolve(key_id, allow_alias=False)
        except NotFoundException:
            # A well-formed blob for a key we do not hold cannot be decrypted here.
            raise InvalidCiphertextException(
                "The ciphertext refers to a KMS key that does not exist in this account and Region."
            ) from None

    # -- operations ---------------------------------------------------------------------------
    def encrypt(
        self,
        key_ref: str,
        plaintext: bytes,
        *,
        context: Context | None = None,
        algorithm: str | None = None,
        dry_run: bool = False,
    ) -> Encrypted:
        """Encrypt. https://docs.aws.amazon.com/kms/latest/APIReference/API_Encrypt.html

        Raises NotFound, Disabled, KMSInvalidState, InvalidKeyUsage, KeyUnavailable, DryRun.
        """
        _check_algorithm(algorithm)
        if not 1 <= len(plaintext) <= 4096:
            raise ValidationException("Plaintext must be 1 to 4096 bytes long.")
        record = self._lookup.resolve(key_ref, allow_alias=True)
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        return Encrypted(self._seal(record, backend, plaintext, context or {}), record.arn)

    def decrypt(
        self,
        blob: bytes,
        *,
        key_ref: str | None = None,
        context: Context | None = None,
        algorithm: str | None = None,
        dry_run: bool = False,
    ) -> Decrypted:
        """Decrypt. https://docs.aws.amazon.com/kms/latest/APIReference/API_Decrypt.html

        Raises InvalidCiphertext, IncorrectKey, NotFound, Disabled, KMSInvalidState, DryRun.
        """
        _check_algorithm(algorithm)
        return self._open(blob, key_ref, context or {}, dry_run)

    def re_encrypt(
        self,
        blob: bytes,
        destination_key_ref: str,
        *,
        source_key_ref: str | None = None,
        source_context: Context | None = None,
        destination_context: Context | None = None,
        dry_run: bool = False,
    ) -> ReEncrypted:
        """ReEncrypt. https://docs.aws.amazon.com/kms/latest/APIReference/API_ReEncrypt.html"""
        destination = self._lookup.resolve(destination_key_ref, allow_alias=True)
        dest_backend = self._usable(destination)
        opened = self._open(blob, source_key_ref, source_context or {}, dry_run)
        sealed = self._seal(destination, dest_backend, opened.plaintext, destination_context or {})
        return ReEncrypted(sealed, opened.key_arn, destination.arn)

    def generate_data_key(
        self,
        key_ref: str,
        *,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        context: Context | None = None,
        dry_run: bool = False,
    ) -> DataKey:
        """GenerateDataKey(WithoutPlaintext): the data key comes from the key's own HSM."""
        size = _data_key_size(key_spec, number_of_bytes)
        record = self._lookup.resolve(key_ref, allow_alias=True)
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        try:
            data_key = backend.random(size)
        except BackendError as exc:
            raise to_kms_error(exc, record.arn) from exc
        blob = self._seal(record, backend, data_key, context or {})
        return DataKey(blob, data_key, record.arn)

    def generate_random(self, number_of_bytes: int | None, store_id: str | None) -> bytes:
        """GenerateRandom; with a CustomKeyStoreId the bytes come from that store's HSM."""
        if number_of_bytes is None or not 1 <= number_of_bytes <= 1024:
            raise ValidationException("NumberOfBytes must be between 1 and 1024.")
        if store_id is None:
            return secrets.token_bytes(number_of_bytes)
        row = self._ctx.store_row(store_id)
        require(StoreOp.GENERATE_RANDOM, store_id, row.store.connection_state)
        store = row.store
        self._ctx.clusters.require_active_hsm(
            store.cluster_id, store_id, CustomKeyStoreInvalidStateException
        )
        try:
            backend = self._ctx.connections.get(
                store.store_id, store.cluster_id, lambda: self._ctx.password_of(row)
            )
            return backend.random(number_of_bytes)
        except BackendError as exc:
            raise to_kms_error(exc, retryable=DependencyTimeoutException) from exc


def _check_algorithm(algorithm: str | None) -> None:
    if algorithm not in (None, SYMMETRIC_DEFAULT):
        raise InvalidKeyUsageException(
            f"EncryptionAlgorithm {algorithm} is not valid for a symmetric KMS key; "
            "use SYMMETRIC_DEFAULT."
        )


def _data_key_size(key_spec: str | None, number_of_bytes: int | None) -> int:
    if (key_spec is None) == (number_of_bytes is None):
        raise ValidationException("Specify exactly one of KeySpec or NumberOfBytes.")
    if key_spec is not None:
        if key_spec not in DATA_KEY_SPECS:
            raise ValidationException(f"KeySpec must be AES_256 or AES_128, not {key_spec}.")
        return DATA_KEY_SPECS[key_spec]
    assert number_of_bytes is not None
    if not 1 <= number_of_bytes <= 1024:
        raise ValidationException("NumberOfBytes must be between 1 and 1024.")
    return number_of_bytes
