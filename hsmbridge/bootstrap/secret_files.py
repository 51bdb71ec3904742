"""Start-up refusal of secrets other users could read, for every process that opens the service.

Owns: `check_secret_files(settings)`. Every file that holds a secret or protects one must be
readable by its owner only: the master key (it decrypts every kmsuser password), the credentials
file (SigV4 secret keys), the SQLite metadata database and its WAL/SHM sidecars (sealed passwords,
key policies), and the demo files `hsmbridge init` writes next to them (`kmsuser.password`,
`softhsm-so.pin`). A file with any group or other permission bit is refused with a ConfigError
naming the file, its mode and the chmod to run. Files that do not exist yet are fine: each is
created 0600 by the component that owns it. The check runs before the metadata store opens,
because that store would otherwise tighten the database's mode silently and hide the exposure.
Must not import uvicorn, pkcs11 or the service layer.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from hsmbridge.config import Settings
from hsmbridge.errors import ConfigError

DEMO_SECRET_FILES: Final = ("kmsuser.password", "softhsm-so.pin")


def secret_files(settings: Settings) -> list[tuple[str, Path]]:
    """(what, path) for every secret-bearing file this configuration names."""
    files = [
        ("master key file", settings.master_key_file),
        ("credentials file", settings.credentials_file),
    ]
    db = settings.metadata_db
    if db is not None:  # a database server's files are its own to protect
        files += [
            ("metadata database", db),
            ("metadata database WAL", db.with_name(db.name + "-wal")),
            ("metadata database shared memory", db.with_name(db.name + "-shm")),
        ]
    files += [(f"secret file {name}", settings.data_dir / name) for name in DEMO_SECRET_FILES]
    return files


def check_private(what: str, path: Path) -> None:
    """Raise ConfigError if `path` exists and grants any permission to group or others."""
    try:
        mode = os.stat(path).st_mode  # follows links: the target's mode is what exposes it
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be checked: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        readable = "world-readable" if mode & stat.S_IROTH else "group-accessible"
        raise ConfigError(
            f"{what} {path} is {readable} (mode {stat.S_IMODE(mode):04o}); it holds secrets and "
            f"must be private to the service user: run `chmod 600 {path}` and start again"
        )


def check_secret_files(settings: Settings) -> None:
    for what, path in secret_files(settings):
        check_private(what, path)
