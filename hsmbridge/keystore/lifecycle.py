"""Which custom key store operations are legal in which ConnectionState, as data.

Owns: the operation-by-state table and `require()`, which raises
CustomKeyStoreInvalidStateException with a message that says what to do. Pure; must not import
metadata, backend or anything above.
"""

from __future__ import annotations

import enum

from hsmbridge.errors import CustomKeyStoreInvalidStateException
from hsmbridge.model import ConnectionState

C = ConnectionState


class StoreOp(enum.StrEnum):
    CONNECT = "ConnectCustomKeyStore"
    DISCONNECT = "DisconnectCustomKeyStore"
    UPDATE_NAME = "UpdateCustomKeyStore (name only)"
    UPDATE_SETTINGS = "UpdateCustomKeyStore"
    DELETE = "DeleteCustomKeyStore"
    CREATE_KEY = "CreateKey"
    GENERATE_RANDOM = "GenerateRandom"


# NOTE: KMS does not document name-only updates while CONNECTING, FAILED or DISCONNECTING; KMS
# documents name changes for CONNECTED and DISCONNECTED only, so the others are refused.
LEGAL: dict[StoreOp, frozenset[ConnectionState]] = {
    StoreOp.CONNECT: frozenset({C.DISCONNECTED, C.CONNECTING, C.CONNECTED}),
    StoreOp.DISCONNECT: frozenset({C.CONNECTING, C.CONNECTED, C.FAILED}),
    StoreOp.UPDATE_NAME: frozenset({C.DISCONNECTED, C.CONNECTED}),
    StoreOp.UPDATE_SETTINGS: frozenset({C.DISCONNECTED}),
    StoreOp.DELETE: frozenset({C.DISCONNECTED}),
    StoreOp.CREATE_KEY: frozenset({C.CONNECTED}),
    StoreOp.GENERATE_RANDOM: frozenset({C.CONNECTED}),
}

_REMEDY: dict[StoreOp, str] = {
    StoreOp.CONNECT: "A FAILED store must be disconnected before it can be connected again.",
    StoreOp.DISCONNECT: "The store is not connected.",
    StoreOp.UPDATE_NAME: "Wait until the store is CONNECTED or DISCONNECTED.",
    StoreOp.UPDATE_SETTINGS: "Disconnect the store before changing its password or cluster.",
    StoreOp.DELETE: "Disconnect the store before deleting it.",
    StoreOp.CREATE_KEY: "Connect the store and wait until it is CONNECTED.",
    StoreOp.GENERATE_RANDOM: "Connect the store and wait until it is CONNECTED.",
}


def require(op: StoreOp, store_id: str, state: ConnectionState) -> None:
    if state not in LEGAL[op]:
        raise CustomKeyStoreInvalidStateException(
            f"{op.value} is not valid for custom key store {store_id} while it is "
            f"{state.value}. {_REMEDY[op]}"
        )
