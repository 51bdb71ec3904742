"""Run `python -m hsmbridge` as its own process, as an operator would: each of its stdin, stdout and
stderr a pipe or a pseudo-terminal (so `isatty()` is really true or false), every wait bounded.

A pty's line discipline turns "\\n" into "\\r\\n" on the way out; `Finished` undoes that, so the
text reads the same whichever way it was captured ("\\r" on its own, the progress bar's redraw,
stays).
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.harness import REPO

STREAMS = ("stdin", "stdout", "stderr")


@dataclass
class Finished:
    code: int
    out: str
    err: str


def hsmbridge_env(**overrides: str | None) -> dict[str, str]:
    """This process's environment (SOFTHSM2_CONF included), hsmbridge importable from the tree;
    a None value removes a variable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_hsmbridge(
    *argv: str | Path,
    tty: Collection[str] = (),
    env: Mapping[str, str] | None = None,
    answer: str | None = None,
    after: str | None = None,
    stdin_text: str = "",
    timeout: float = 120.0,
) -> Finished:
    """`python -m hsmbridge ARGV`; `tty` names the streams that get a pseudo-terminal.

    With `answer`, the process must print `after` on stderr first (a prompt), then `answer` is
    typed on its stdin. Otherwise `stdin_text` is written to stdin and, for a pipe, stdin is then
    closed. Kills the process and fails if it has not finished within `timeout` seconds.
    """
    assert set(tty) <= set(STREAMS), tty
    assert (answer is None) == (after is None)
    child: dict[str, int] = {}
    ours: dict[str, int] = {}
    for name in STREAMS:
        if name in tty:
            ours[name], child[name] = pty.openpty()
        elif name == "stdin":
            child[name], ours[name] = os.pipe()
        else:
            ours[name], child[name] = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hsmbridge", *map(str, argv)],
            stdin=child["stdin"],
            stdout=child["stdout"],
            stderr=child["stderr"],
            env=dict(env) if env is not None else hsmbridge_env(),
            cwd=REPO,
        )
    finally:
        for fd in child.values():
            os.close(fd)
    try:
        deadline = time.monotonic() + timeout
        return _talk(
            proc, ours, answer=answer, after=after, stdin_text=stdin_text, deadline=deadline
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for fd in ours.values():
            with contextlib.suppress(OSError):  # stdin may have been closed already
                os.close(fd)


def _talk(
    proc: subprocess.Popen[bytes],
    fds: dict[str, int],
    *,
    answer: str | None,
    after: str | None,
    stdin_text: str,
    deadline: float,
) -> Finished:
    data = {"stdout": b"", "stderr": b""}
    if answer is None:
        if stdin_text:
            os.write(fds["stdin"], stdin_text.encode())
        if not os.isatty(fds["stdin"]):
            os.close(fds.pop("stdin"))  # EOF: a pipe with nothing more to come
    open_fds = {fds["stdout"]: "stdout", fds["stderr"]: "stderr"}
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"hsmbridge still running after its time limit; so far: {data}")
        ready, _, _ = select.select(list(open_fds), [], [], min(left, 1.0))
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every holder of the pty's other end has closed it
                chunk = b""
            if not chunk:
                del open_fds[fd]
                continue
            data[open_fds[fd]] += chunk
        if answer is not None and after is not None and after.encode() in data["stderr"]:
            os.write(fds["stdin"], (answer + "\n").encode())
            answer = None
    code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    if answer is not None:
        raise AssertionError(f"hsmbridge never printed {after!r}; stderr: {data['stderr']!r}")

    def text(raw: bytes) -> str:
        return raw.decode("utf-8", "replace").replace("\r\n", "\n")

    return Finished(code, text(data["stdout"]), text(data["stderr"]))
