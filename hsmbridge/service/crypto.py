"""Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext),
GenerateRandom; Sign, Verify, GenerateMac and VerifyMac, which every key here refuses.

Owns: key-state checks for cryptography, the algorithm and size rules, DryRun, where each
operation is charged to the request quotas (`ctx.quotas`), and turning HSM AES-GCM results into
versioned ciphertext blobs via `envelope`. Plaintext and data keys never leave this module except
in the response. Must not import protocol, http or cli.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from hsmbridge import nowait
from hsmbridge.backend import HsmBackend, Sealed
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
from hsmbridge.request import RequestContext
from hsmbridge.service import envelope
from hsmbridge.service.context import ServiceContext
from hsmbridge.service.hsm import HsmGateway
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
    def __init__(self, ctx: ServiceContext, lookup: KeyLookup, hsm: HsmGateway) -> None:
        self._ctx = ctx
        self._lookup = lookup
        self._hsm = hsm

    # -- helpers ------------------------------------------------------------------------------
    def _charge(self, caller: RequestContext, store_id: str | None) -> None:
        """Count the request against the caller's account and the key's store, or throttle it.

        Called as soon as the key is found: KMS throttles before it authorizes (an AccessDenied,
        DryRun or Disabled answer still counted), and the store quota needs the key's store.
        A KeyId that names no key is not counted (NOTE: KMS would count it). Counted once even
        when the request runs twice (an inline attempt refused, then its rerun: `nowait`)."""
        if nowait.first_time("quota"):
            self._ctx.quotas.charge_cryptographic(caller.account_id, store_id)

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
        return self._hsm.for_key(record, row)

    def _seal(self, record: KeyRecord, backend: HsmBackend, data: bytes, ctx: Context) -> bytes:
        with self._hsm.translated(record.arn):
            sealed = backend.encrypt(record.arn, data, envelope.aad_for(record.arn, ctx))
        return envelope.pack(envelope.Envelope(record.key_id, sealed.iv, sealed.ciphertext))

    def _open(
        self,
        caller: RequestContext,
        action: str,
        blob: bytes,
        key_ref: str | None,
        *,
        ctx: Context,
        dry_run: bool,
        charge: bool = True,
    ) -> Decrypted:
        env = envelope.unpack(blob)
        record = self._record_for_blob(env.key_id)
        if charge:
            self._charge(caller, record.custom_key_store_id)
        self._ctx.authorize_key(
            caller, action, record, context=ctx, keys={"kms:EncryptionAlgorithm": SYMMETRIC_DEFAULT}
        )
        if key_ref is not None:
            named = self._lookup.resolve(caller, key_ref, allow_alias=True)
            if named.key_id != record.key_id:
                raise IncorrectKeyException(
                    "The key ID in the request does not identify the KMS key that encrypted the "
                    "ciphertext."
                )
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        with self._hsm.translated(record.arn):
            plaintext = backend.decrypt(
                record.arn, Sealed(env.iv, env.ciphertext), envelope.aad_for(record.arn, ctx)
            )
        return Decrypted(plaintext, record.arn)

    def _record_for_blob(self, key_id: str) -> KeyRecord:
        try:
            return self._lookup.resolve(None, key_id, allow_alias=False)
        except NotFoundException:
            # A well-formed blob for a key we do not hold cannot be decrypted here.
            raise InvalidCiphertextException(
                "The ciphertext refers to a KMS key that does not exist in this account and Region."
            ) from None

    # -- operations ---------------------------------------------------------------------------
    def encrypt(
        self,
        caller: RequestContext,
        key_ref: str,
        plaintext: bytes,
        *,
        context: Context | None = None,
        algorithm: str | None = None,
        dry_run: bool = False,
    ) -> Encrypted:
        """Encrypt. https://docs.aws.amazon.com/kms/latest/APIReference/API_Encrypt.html

        Raises NotFound, Disabled, KMSInvalidState, InvalidKeyUsage, KeyUnavailable, DryRun,
        Throttling.
        """
        _check_algorithm(algorithm)
        if not 1 <= len(plaintext) <= 4096:
            raise ValidationException("Plaintext must be 1 to 4096 bytes long.")
        record = self._lookup.resolve(caller, key_ref, allow_alias=True)
        self._charge(caller, record.custom_key_store_id)
        self._ctx.authorize_key(
            caller,
            "kms:Encrypt",
            record,
            context=context or {},
            keys={"kms:EncryptionAlgorithm": SYMMETRIC_DEFAULT},
        )
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        return Encrypted(self._seal(record, backend, plaintext, context or {}), record.arn)

    def decrypt(
        self,
        caller: RequestContext,
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
        return self._open(caller, "kms:Decrypt", blob, key_ref, ctx=context or {}, dry_run=dry_run)

    def re_encrypt(
        self,
        caller: RequestContext,
        blob: bytes,
        destination_key_ref: str,
        *,
        source_key_ref: str | None = None,
        source_context: Context | None = None,
        destination_context: Context | None = None,
        source_algorithm: str | None = None,
        destination_algorithm: str | None = None,
        dry_run: bool = False,
    ) -> ReEncrypted:
        """ReEncrypt. https://docs.aws.amazon.com/kms/latest/APIReference/API_ReEncrypt.html

        Both algorithms must be SYMMETRIC_DEFAULT (or absent), as for Encrypt and Decrypt."""
        _check_algorithm(source_algorithm, "SourceEncryptionAlgorithm")
        _check_algorithm(destination_algorithm, "DestinationEncryptionAlgorithm")
        destination = self._lookup.resolve(caller, destination_key_ref, allow_alias=True)
        # One request, counted once: against the caller's account and the destination key's
        # store, which seals the result; the source key's store is not charged again.
        self._charge(caller, destination.custom_key_store_id)
        self._ctx.authorize_key(
            caller, "kms:ReEncryptTo", destination, context=destination_context or {}
        )
        dest_backend = self._usable(destination)
        source = source_context or {}
        opened = self._open(
            caller,
            "kms:ReEncryptFrom",
            blob,
            source_key_ref,
            ctx=source,
            dry_run=dry_run,
            charge=False,
        )
        sealed = self._seal(destination, dest_backend, opened.plaintext, destination_context or {})
        return ReEncrypted(sealed, opened.key_arn, destination.arn)

    def generate_data_key(
        self,
        caller: RequestContext,
        key_ref: str,
        *,
        without_plaintext: bool = False,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        context: Context | None = None,
        dry_run: bool = False,
    ) -> DataKey:
        """GenerateDataKey(WithoutPlaintext): the data key comes from the key's own HSM."""
        size = _data_key_size(key_spec, number_of_bytes)
        record = self._lookup.resolve(caller, key_ref, allow_alias=True)
        action = (
            "kms:GenerateDataKeyWithoutPlaintext" if without_plaintext else "kms:GenerateDataKey"
        )
        self._charge(caller, record.custom_key_store_id)
        self._ctx.authorize_key(caller, action, record, context=context or {})
        backend = self._usable(record)
        if dry_run:
            raise DryRunOperationException(DRY_RUN_MESSAGE)
        with self._hsm.translated(record.arn):
            data_key = backend.random(size)
        blob = self._seal(record, backend, data_key, context or {})
        return DataKey(blob, data_key, record.arn)

    def generate_random(
        self, caller: RequestContext, number_of_bytes: int | None, store_id: str | None
    ) -> bytes:
        """GenerateRandom; with a CustomKeyStoreId the bytes come from that store's HSM.

        Counted against the caller's account and, with a CustomKeyStoreId, that store, once the
        store is found (an unknown store id makes no bucket)."""
        self._ctx.authorize(caller, "kms:GenerateRandom")
        if number_of_bytes is None or not 1 <= number_of_bytes <= 1024:
            raise ValidationException("NumberOfBytes must be between 1 and 1024.")
        if store_id is None:
            self._charge(caller, None)
            return secrets.token_bytes(number_of_bytes)
        row = self._ctx.store_row(store_id)
        self._charge(caller, store_id)
        require(StoreOp.GENERATE_RANDOM, store_id, row.store.connection_state)
        store = row.store
        self._ctx.clusters.require_active_hsm(
            store.cluster_id, store_id, CustomKeyStoreInvalidStateException
        )
        backend = self._hsm.login(row, retryable=DependencyTimeoutException)
        with self._hsm.translated(retryable=DependencyTimeoutException):
            return backend.random(number_of_bytes)

    def refuse_key_usage(self, caller: RequestContext, key_ref: str, operation: str) -> NoReturn:
        """Sign, Verify, GenerateMac, VerifyMac: every key here is a SYMMETRIC_DEFAULT
        ENCRYPT_DECRYPT key, which KMS refuses for them with InvalidKeyUsageException, after
        finding the key (NotFound) and authorizing the caller (AccessDenied)."""
        record = self._lookup.resolve(caller, key_ref, allow_alias=True)
        self._charge(caller, record.custom_key_store_id)  # KMS counts these against the quota too
        self._ctx.authorize_key(caller, f"kms:{operation}", record)
        raise InvalidKeyUsageException(
            f"{record.arn} key usage is {record.key_usage.value} which is not valid for "
            f"{operation}."
        )


def _check_algorithm(algorithm: str | None, member: str = "EncryptionAlgorithm") -> None:
    if algorithm not in (None, SYMMETRIC_DEFAULT):
        raise InvalidKeyUsageException(
            f"{member} {algorithm} is not valid for a symmetric KMS key; use SYMMETRIC_DEFAULT."
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
