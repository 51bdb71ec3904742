"""Encryption at rest for the kmsuser passwords of custom key stores.

Owns: `PasswordVault`, which keeps a 32-byte master key in a 0600 file and seals each password
with AES-256-GCM, binding the blob to its custom key store id so that a blob copied onto another
store's row does not decrypt.

Blob layout: version (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes).
AAD: b"hsmbridge/kmsuser-password" || version || store id (UTF-8).
Version 1 seals the password itself. Version 2 seals a `PasswordRecord` as JSON: the password
plus the new ones a rotation has tried to set (`pending`): written before the HSM is asked to
change it, so that a crash between the change and the write that follows it still leaves a
password that logs in among the candidates.

WARNING: a password, or the master key, must never reach an exception message, a log line or a
repr. Messages here name only the key file and the store id.

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmbridge.errors import ConfigError, HsmbridgeError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
VERSION = 1
RECORD_VERSION = 2
_AAD_PREFIX = b"hsmbridge/kmsuser-password"


class SealedPasswordError(HsmbridgeError):
    """A sealed password blob is malformed, altered, for another store, or for another key."""


@dataclass(frozen=True)
class PasswordRecord:
    """A store's kmsuser password and, during a rotation, the new ones it may already have.

    WARNING: secrets; kept out of repr."""

    current: str = field(repr=False)
    pending: tuple[str, ...] = field(default=(), repr=False)

    def candidates(self) -> tuple[str, ...]:
        """Every password the HSM may hold now, the likeliest first."""
        return (self.current, *(p for p in self.pending if p != self.current))


class PasswordVault:
    """`key`: the master key itself (`hsmbridge.keystore.master_key`), `key_file` then only
    names where it came from; without it, the key file is read (or created)."""

    def __init__(self, key_file: Path | str, *, key: bytes | None = None) -> None:
        self.key_file = key_file if isinstance(key_file, str) else Path(key_file)
        if key is None:
            key = load_or_create_key(Path(key_file))
        if len(key) != KEY_SIZE:
            raise ConfigError(f"the master key from {key_file} is not {KEY_SIZE} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"PasswordVault(key_file={str(self.key_file)!r})"

    def seal(self, password: str, store_id: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_SIZE)
        version = bytes([VERSION])
        sealed = self._aead.encrypt(nonce, password.encode("utf-8"), _aad(version, store_id))
        return version + nonce + sealed

    def seal_record(self, record: PasswordRecord, store_id: str) -> bytes:
        if not record.pending:
            return self.seal(record.current, store_id)
        nonce = secrets.token_bytes(NONCE_SIZE)
        version = bytes([RECORD_VERSION])
        body = json.dumps({"current": record.current, "pending": list(record.pending)})
        sealed = self._aead.encrypt(nonce, body.encode("utf-8"), _aad(version, store_id))
        return version + nonce + sealed

    def unseal(self, blob: bytes, store_id: str) -> str:
        return self.unseal_record(blob, store_id).current

    def unseal_record(self, blob: bytes, store_id: str) -> PasswordRecord:
        plain = self._open(blob, store_id).decode("utf-8")
        if blob[0] == VERSION:
            return PasswordRecord(plain)
        try:
            doc = json.loads(plain)
            return PasswordRecord(str(doc["current"]), tuple(str(p) for p in doc["pending"]))
        except (ValueError, KeyError, TypeError):
            raise SealedPasswordError(
                f"the stored kmsuser password of custom key store {store_id} is malformed "
                "(a rotation record that does not parse)"
            ) from None

    def _open(self, blob: bytes, store_id: str) -> bytes:
        if len(blob) < 1 + NONCE_SIZE + TAG_SIZE or blob[0] not in (VERSION, RECORD_VERSION):
            raise SealedPasswordError(
                f"the stored kmsuser password of custom key store {store_id} is malformed "
                f"(unknown version or truncated)"
            )
        version, nonce, sealed = blob[:1], blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
        try:
            plain = self._aead.decrypt(nonce, sealed, _aad(version, store_id))
        except InvalidTag:
            raise SealedPasswordError(
                f"the stored kmsuser password of custom key store {store_id} does not decrypt: "
                f"the record was altered or belongs to another store, or {self.key_file} is not "
                "the master key it was sealed with; set the password again with "
                "UpdateCustomKeyStore(KeyStorePassword) while disconnected"
            ) from None
        return plain


def _aad(version: bytes, store_id: str) -> bytes:
    return _AAD_PREFIX + version + store_id.encode("utf-8")


def load_or_create_key(path: Path) -> bytes:
    """The 32-byte key in a 0600 file, created with a random key if the file does not exist."""
    if not os.path.lexists(path):
        # Losing a creation race is fine: the winner's key is read and checked below.
        with contextlib.suppress(FileExistsError):
            _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"master key file {path} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"master key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            )
        key = fh.read(KEY_SIZE + 1)
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"master key file {path} must hold exactly {KEY_SIZE} bytes, found "
            f"{'more' if len(key) > KEY_SIZE else len(key)}; restore it from backup"
        )
    return key


def _create_key(path: Path) -> None:
    """Publish a fresh random key atomically; raises FileExistsError if one already exists.

    The key is written to a private temporary file and hard-linked into place, so a concurrent
    reader never sees an empty or half-written key and a concurrent creator cannot overwrite it.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"master key file {path} cannot be created: {exc.strerror}") from None
    try:
        try:
            if os.write(fd, secrets.token_bytes(KEY_SIZE)) != KEY_SIZE:
                raise ConfigError(f"master key file {path}: short write while creating it")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
