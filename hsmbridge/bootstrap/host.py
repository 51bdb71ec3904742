"""The host side of start-up, done once before anything opens a file or loads an HSM library.

Owns: `prepare(settings)`: refuse exposed secret files, export the HSM library's environment
(e.g. SOFTHSM2_CONF) and create the data directory, in that order. The secret check comes first
because the metadata store would tighten the database's mode when it opens and hide the
exposure; the environment must be set before any PKCS#11 module loads, since SoftHSM reads it
once per process. `prepare_host(settings)` is the same without the secret check, for a
standalone HSM audit that opens neither the master key nor the metadata. Both are idempotent.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from hsmbridge.bootstrap.secret_files import check_secret_files
from hsmbridge.config import Settings


def prepare_host(settings: Settings) -> None:
    settings.apply_hsm_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)


def prepare(settings: Settings) -> None:
    """Raise ConfigError, touching nothing, if a secret file is group- or world-accessible."""
    check_secret_files(settings)
    prepare_host(settings)
