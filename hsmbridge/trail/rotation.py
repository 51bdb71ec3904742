"""The audit file on disk: opening it, rotating it by size across processes, and reading it back.

Owns: the names of the rotation chain (`audit.jsonl`, then `audit.jsonl.1` newest to
`audit.jsonl.N` oldest), `follow` (the check a sink runs off the request path: reopen the path if
another process rotated it, rotate it if it is over its size) and `audit_files` / `read_lines`
(the chain oldest first, for readers).

Several server processes append to one file, each through its own descriptor (O_APPEND, whole
lines per write). Rotation is a rename chain under an exclusive `flock` on `audit.jsonl.lock`,
re-checked under the lock, so one process rotates and the others notice at their next check (the
path no longer names the file they hold) and reopen it. A line written to a descriptor after
another process renamed its file lands in `audit.jsonl.1`: late, never lost, unless `backups`
rotations happen between two checks of that process. Every file is 0600 and opened O_NOFOLLOW.
Must not import anything from hsmbridge.
"""

from __future__ import annotations

import fcntl
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

_APPEND: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
LOCK_SUFFIX: Final = ".lock"


def open_append(path: Path) -> int:
    """A descriptor appending to `path`, created 0600 if missing."""
    fd = os.open(path, _APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file may predate the rule; audit data is private
    except OSError:
        os.close(fd)
        raise
    return fd


def backup_path(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def follow(path: Path, fd: int, *, max_bytes: int, backups: int) -> int | None:
    """The descriptor to write to from now on, or None to keep `fd`.

    A new one when `path` no longer names `fd`'s file (another process rotated it, or an operator
    moved it) or when this call rotated it for being over `max_bytes`. The caller closes `fd`
    once it has switched.
    """
    if not _names(path, fd):
        return open_append(path)
    if os.fstat(fd).st_size <= max_bytes:
        return None
    with _exclusive(path.with_name(path.name + LOCK_SUFFIX)):
        # Another process may have rotated between our check and the lock: never rotate twice.
        if not _names(path, fd):
            return open_append(path)
        if os.fstat(fd).st_size <= max_bytes:
            return None
        _shift(path, backups)
        return open_append(path)


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is still the file `fd` writes to."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _shift(path: Path, backups: int) -> None:
    """audit.jsonl -> .1 -> .2 ... -> .backups; os.replace drops the oldest in passing."""
    for n in range(backups - 1, 0, -1):
        try:
            os.replace(backup_path(path, n), backup_path(path, n + 1))
        except FileNotFoundError:
            continue
    os.replace(path, backup_path(path, 1))


def audit_files(path: Path) -> list[Path]:
    """The trail's files oldest first: `path.N` ... `path.1`, then `path`; missing ones skipped.

    Every numbered file present counts, not only `backups` of them: a lowered `backups` leaves
    older files behind, and they are still the oldest part of the trail.
    """
    numbered: list[tuple[int, Path]] = []
    for name in glob.glob(glob.escape(path.name) + ".*", root_dir=path.parent):
        suffix = name[len(path.name) + 1 :]
        if suffix.isascii() and suffix.isdigit():
            numbered.append((int(suffix), path.parent / name))
    files = [file for _, file in sorted(numbered, reverse=True)]
    return [*files, path] if path.exists() else files


def read_lines(path: Path) -> Iterator[str]:
    """Every line of the trail, oldest file first. A rotation while reading may skip or repeat
    one file's lines: readers that need an exact count read a quiet trail."""
    for file in audit_files(path):
        try:
            with file.open(encoding="utf-8") as fh:
                yield from (line.rstrip("\n") for line in fh)
        except FileNotFoundError:  # rotated away between listing and opening
            continue
