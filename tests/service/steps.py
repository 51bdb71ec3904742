"""Service calls the service tests repeat, on a fake or a SoftHSM2 environment alike: a CreateKey
request for the env's store, a new key in it, and the store's connection state as described."""

from __future__ import annotations

from typing import Any

from hsmbridge.model import ConnectionState
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN
from tests.harness import KmsEnv


def key_request(env: KmsEnv, **overrides: Any) -> CreateKeyRequest:
    """CreateKey for a key in the env's store (Origin AWS_CLOUDHSM), with field overrides."""
    fields = {"custom_key_store_id": env.store_id, "origin": "AWS_CLOUDHSM"} | overrides
    return CreateKeyRequest(**fields)


def new_key(env: KmsEnv) -> str:
    """A new Enabled key in the env's store; its key id."""
    return env.svc.keys.create(ADMIN, key_request(env)).key_id


def store_state(env: KmsEnv, store_id: str | None = None) -> tuple[ConnectionState, object]:
    """(ConnectionState, ConnectionErrorCode or None) of the env's store, or of `store_id`."""
    store = env.svc.keystores.describe(ADMIN, store_id or env.store_id).items[0]
    return store.connection_state, store.connection_error_code
