"""Where the master key that seals the kmsuser passwords comes from.

Owns: `load_master_key(key_file, command, environ)`. In order of precedence:
1. the environment variable HSMBRIDGE_MASTER_KEY (the 32 bytes, base64);
2. `[secrets] master_key_command`: a command whose standard output is the key (base64), such as
   a secrets manager's CLI, run once per process with no shell;
3. `[paths] master_key`: a 0600 file, created with a fresh random key if it does not exist.
With 1 or 2 the key never touches the data directory, so a copy of that directory (the metadata
with its sealed passwords, and a copy of the token) no longer yields the kmsuser password.
WARNING: the key never reaches a message, a log line or a repr.
Must not import: hsmbridge.metadata, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import base64
import binascii
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from hsmbridge.errors import ConfigError
from hsmbridge.keystore.passwords import KEY_SIZE, load_or_create_key

ENV_VAR: Final = "HSMBRIDGE_MASTER_KEY"
COMMAND_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True)
class MasterKey:
    key: bytes = field(repr=False)
    source: str  # for messages: the file, the command or the variable it came from


def load_master_key(
    key_file: Path, command: Sequence[str], environ: Mapping[str, str]
) -> MasterKey:
    """The master key from the first source that is configured; ConfigError if it is unusable."""
    if environ.get(ENV_VAR):
        where = f"the environment variable {ENV_VAR}"
        return MasterKey(_decode(environ[ENV_VAR], where), where)
    if command:
        where = f"[secrets] master_key_command ({command[0]})"
        return MasterKey(_decode(_run(command, where), where), where)
    return MasterKey(load_or_create_key(key_file), str(key_file))


def _run(command: Sequence[str], where: str) -> str:
    try:
        done = subprocess.run(  # argv from the operator's configuration, no shell
            list(command),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ConfigError(f"{where}: the command does not exist") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{where}: no answer within {COMMAND_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        # Its standard error only: the key, if any, is on standard output.
        said = " ".join(done.stderr.split())[-200:] or "nothing on standard error"
        raise ConfigError(f"{where}: exit status {done.returncode} ({said})")
    return done.stdout


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where} is not base64 (the {KEY_SIZE}-byte master key)") from None
    if len(key) != KEY_SIZE:
        raise ConfigError(f"{where} holds {len(key)} bytes; the master key is {KEY_SIZE}")
    return key
