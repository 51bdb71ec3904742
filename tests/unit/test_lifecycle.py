"""The operation-by-ConnectionState legality table, cell by cell."""

from __future__ import annotations

import pytest

from hsmbridge.errors import CustomKeyStoreInvalidStateException
from hsmbridge.keystore.lifecycle import LEGAL, StoreOp, require
from hsmbridge.model import ConnectionState

C = ConnectionState
OK, NO = True, False
ORDER = (C.DISCONNECTED, C.CONNECTING, C.CONNECTED, C.FAILED, C.DISCONNECTING)

# Spec §3.4, columns in ORDER. [U] cells follow the recommendations written next to them there.
SPEC_TABLE = {
    StoreOp.CONNECT: (OK, OK, OK, NO, NO),
    StoreOp.DISCONNECT: (NO, OK, OK, OK, NO),
    StoreOp.UPDATE_NAME: (OK, NO, OK, NO, NO),
    StoreOp.UPDATE_SETTINGS: (OK, NO, NO, NO, NO),
    StoreOp.DELETE: (OK, NO, NO, NO, NO),
    StoreOp.CREATE_KEY: (NO, NO, OK, NO, NO),
    StoreOp.GENERATE_RANDOM: (NO, NO, OK, NO, NO),
}

CELLS = [(op, state, SPEC_TABLE[op][i]) for op in StoreOp for i, state in enumerate(ORDER)]


def test_table_covers_every_operation_and_state() -> None:
    assert set(SPEC_TABLE) == set(StoreOp) == set(LEGAL)
    assert set(ORDER) == set(ConnectionState)


@pytest.mark.parametrize(
    ("op", "state", "legal"), CELLS, ids=[f"{o.name}-{s}" for o, s, _ in CELLS]
)
def test_cell(op: StoreOp, state: ConnectionState, legal: bool) -> None:
    if legal:
        require(op, "cks-0123456789abcdef0", state)
        return
    with pytest.raises(CustomKeyStoreInvalidStateException) as caught:
        require(op, "cks-0123456789abcdef0", state)
    message = caught.value.message
    # The message names the operation, the store and the state, and says what to do.
    assert op.value in message
    assert "cks-0123456789abcdef0" in message
    assert state.value in message
    assert message.rstrip().endswith(".")
    assert not caught.value.fault


def test_failed_store_message_says_disconnect_first() -> None:
    with pytest.raises(CustomKeyStoreInvalidStateException, match="disconnected before"):
        require(StoreOp.CONNECT, "cks-0123456789abcdef0", C.FAILED)
