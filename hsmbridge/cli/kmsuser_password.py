"""The kmsuser password on the command line's edge: from a file or the environment, never argv.

Owns: `PASSWORD_ENV`, `RefusePassword` (a hidden `--password` that is refused without argparse
echoing the value back) and `read_password`, shared by the commands that log in as the crypto
user themselves (`audit --cluster`, `doctor`). The value is never printed or logged.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from hsmbridge.errors import ConfigError

PASSWORD_ENV = "HSMBRIDGE_KMSUSER_PASSWORD"  # noqa: S105 - the variable's name, not a secret


class RefusePassword(argparse.Action):
    """`--password` exists only to be refused without argparse echoing its value back."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"the kmsuser password is never taken from the command line: use --password-file "
            f"or ${PASSWORD_ENV}"
        )


def add_refused_password(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password", nargs="?", action=RefusePassword, help=argparse.SUPPRESS)


def read_text(path: Path, what: str) -> str:
    """A file's text; ConfigError naming it when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{what} {path} cannot be read: {why}") from None


def read_password(path: Path | None, needed_by: str) -> str:
    """From the file (a warning when others may read it), else the environment; ConfigError
    saying `needed_by` needs it when neither gives one."""
    if path is not None:
        _warn_if_exposed(path)
        text = read_text(path, "password file").rstrip("\r\n")
    else:
        text = os.environ.get(PASSWORD_ENV, "")
    if not text:
        raise ConfigError(f"{needed_by}: --password-file or ${PASSWORD_ENV}")
    return text


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it reports the problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"warning: password file {path} is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`",
            file=sys.stderr,
        )
