"""The static cluster inventory as a document to change: hsmbridge's CloudHSM v2 API writes here.

Owns: `InventoryFile`, the locked read-modify-write of the describe-clusters JSON file that
`StaticInventory` reads. The file stays the single source of truth, shared by every worker
process and every hsmbridge instance on the same filesystem:

* writers take an exclusive `fcntl.flock` on a sibling lock file (`clusters.json.lock`; never on
  the document itself, which `os.replace` swaps for a new inode), read, change, write a temporary
  file in the same directory, fsync it, `os.replace` it over the document and fsync the
  directory. A crash leaves either the old or the new document, never a torn one;
* readers (`StaticInventory`, `read()`) take no lock: a rename is atomic, so they see one
  complete version or the other.

Delayed HSM transitions are not applied by anyone in the background: the HSM entry carries its
`TRANSITION_AT` and every reader resolves it against its clock (`inventory.effective_hsm_state`).
`read()` and `update()` hand out the document with due transitions already applied, and a write
stores them so (finished creations ACTIVE, finished deletions gone).

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hsmbridge.errors import ConfigError
from hsmbridge.keystore.inventory import (
    Clock,
    load_static_document,
    parse_static_document,
    resolve_transitions,
)

T = TypeVar("T")

LOCK_SUFFIX = ".lock"


class InventoryFile:
    """One describe-clusters JSON file, read and changed as a whole document."""

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.clock = clock

    def __repr__(self) -> str:
        return f"InventoryFile({str(self.path)!r})"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + LOCK_SUFFIX)

    def read(self) -> dict[str, Any]:
        """The whole document, validated, with the transitions due now applied (private members
        included: callers that publish it strip them). ConfigError when it is unreadable."""
        return self._load(self.clock())

    def update(self, change: Callable[[dict[str, Any]], T]) -> T:
        """Run `change` on the current document under the writers' lock and store the document
        it leaves (it mutates it in place), atomically; returns what `change` returns.

        If `change` raises, nothing is written. The changed document must still parse as an
        inventory (ConfigError otherwise, and nothing is written): a bad write would stop
        every KMS operation on every cluster."""
        with self._locked():
            now = self.clock()
            stored = self._load_stored(now)
            doc = copy.deepcopy(stored)
            resolve_transitions(doc, now)
            result = change(doc)
            parse_static_document(self.path, doc, now)
            if doc != stored:  # changed, or due transitions to store resolved
                self._write(doc)
            return result

    # --- internals -------------------------------------------------------------------------

    def _load_stored(self, now: float) -> dict[str, Any]:
        """The document as stored, validated (ConfigError naming the bad field)."""
        doc = load_static_document(self.path)
        parse_static_document(self.path, doc, now)
        assert isinstance(doc, dict)  # the parser checked it is an object
        return doc

    def _load(self, now: float) -> dict[str, Any]:
        doc = self._load_stored(now)
        resolve_transitions(doc, now)
        return doc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cluster inventory lock {self.lock_path} cannot be opened: {exc}"
            ) from None
        try:
            # Per open file description: other processes and other threads (each opens its
            # own) wait here alike.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, doc: dict[str, Any]) -> None:
        directory = self.path.parent
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        try:
            mode = os.stat(self.path).st_mode & 0o7777
        except OSError:
            mode = 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            try:
                os.fchmod(fd, mode)  # mkstemp makes 0600; keep the document's own mode
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
