"""The STS server key and the STS service over it: what makes temporary credentials work.

Owns: `load_or_create_session_key(path)` (the 32-byte key in `sts.key` next to the
configuration, created 0600 and atomically if missing: several worker processes start at once
and must all end up with the same key), `session_key_path`, `open_session_issuer` and
`open_sts_service`. A session token is valid wherever this key is, so it survives a restart and
is accepted by every worker; replacing the file ends every session issued under the old key.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Final

from hsmbridge.bootstrap.secret_files import check_private
from hsmbridge.config import Settings
from hsmbridge.errors import ConfigError
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.identity.sessions import KEY_BYTES, SessionIssuer
from hsmbridge.service.context import Clock
from hsmbridge.service.sts import StsService

SESSION_KEY_FILE: Final = "sts.key"
IAM_DIRECTORY: Final = "iam"


def session_key_path(settings: Settings) -> Path:
    """`sts.key` beside the configuration file."""
    return settings.config_path.parent / SESSION_KEY_FILE


def iam_directory_path(settings: Settings) -> Path:
    """The IAM directory the configuration names (`[paths] iam`, by default `iam/`)."""
    return settings.iam_dir


def _read_key(path: Path) -> bytes:
    check_private("STS key file", path)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"STS key file {path} cannot be read: {exc.strerror}") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"STS key file {path} holds {len(key)} bytes, not {KEY_BYTES}; remove it to have a "
            "new key made (every session issued under the old one then ends)"
        )
    return key


def load_or_create_session_key(path: Path) -> bytes:
    """The key in `path`, made first if the file does not exist.

    The new key is written to a private temporary file in the same directory and linked into
    place: `link` fails if the name exists, so of two processes racing exactly one key wins, and
    the name never shows a partly written file. The loser reads the winner's key.
    """
    if path.exists():
        return _read_key(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            pass  # another process won the race; its key is complete (it was linked whole)
        except OSError:
            # A filesystem without hard links: fall back to an exclusive create of the name.
            _create_exclusive(path, Path(tmp_name).read_bytes())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return _read_key(path)


def _create_exclusive(path: Path, key: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # The winner may still be writing: wait (briefly) for the whole key to be there.
        deadline = time.monotonic() + 5.0
        while path.stat().st_size < KEY_BYTES and time.monotonic() < deadline:
            time.sleep(0.01)
        return
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())


def open_session_issuer(settings: Settings) -> SessionIssuer:
    return SessionIssuer(load_or_create_session_key(session_key_path(settings)))


def open_sts_service(
    settings: Settings,
    *,
    iam: IamDirectory | None = None,
    issuer: SessionIssuer | None = None,
    clock: Clock = time.time,
) -> StsService:
    """The STS service of this configuration: its IAM directory and its session key."""
    return StsService(
        iam or IamDirectory(iam_directory_path(settings)),
        issuer or open_session_issuer(settings),
        clock,
    )
