"""The serving process's own tuning: `OneSendPerResponse` (a response's status line and headers
leave with its body in one write, and nothing is ever left behind: HEAD, close, abort,
100 Continue, error pages), and the garbage collector's settings while serving."""

from __future__ import annotations

import gc
from typing import Any

from hsmbridge.http.server import GC_GEN0_THRESHOLD, OneSendPerResponse, tune_gc_for_serving

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed


def _wrapped() -> tuple[OneSendPerResponse, _Transport]:
    inner = _Transport()
    return OneSendPerResponse(inner), inner  # type: ignore[arg-type]


def test_headers_and_body_leave_in_one_write() -> None:
    sender, inner = _wrapped()
    sender.write(HEAD)
    assert inner.writes == []
    sender.write(b"{}")
    sender.flush()  # the response is complete: nothing is held any more
    assert inner.writes == [HEAD + b"{}"]


def test_a_response_without_a_body_write_goes_out_when_complete() -> None:
    sender, inner = _wrapped()
    sender.write(HEAD)  # HEAD: uvicorn writes no body
    sender.flush()
    assert inner.writes == [HEAD]
    sender.flush()
    assert inner.writes == [HEAD]


def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    sender, inner = _wrapped()
    sender.write(HEAD)
    sender.close()
    assert inner.writes == [HEAD]
    assert inner.closed
    sender, inner = _wrapped()
    sender.write(HEAD)
    sender.abort()
    assert inner.writes == []
    assert inner.aborted


def test_other_writes_go_out_at_once() -> None:
    sender, inner = _wrapped()
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    sender.write(cont)  # the client waits for it before it sends its body
    page = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nnope."
    sender.write(page)  # uvicorn's own error answers are written whole
    sender.write(b"HTTP/1.1 chunk of a body")
    assert inner.writes == [cont, page, b"HTTP/1.1 chunk of a body"]
    assert not sender.is_closing()  # everything else is the real transport's


def test_serving_processes_collect_garbage_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0  # start-up's objects are never scanned again
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
