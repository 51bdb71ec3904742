"""The shared environment fixtures themselves: a store connects and a key lands in the token, on
SoftHSM2 (`kms_env`) and on the fake HSM (`fake_env`, whose token outlives a restart too)."""

from hsmbridge.model import ConnectionState, KeyState
from hsmbridge.service.keys import CreateKeyRequest
from tests.callers import ADMIN


def test_seed_scenario_smoke(kms_env):
    svc = kms_env.svc
    store = svc.keystores.describe(ADMIN, kms_env.store_id).items[0]
    assert store.connection_state is ConnectionState.CONNECTED
    meta = svc.keys.create(
        ADMIN, CreateKeyRequest(custom_key_store_id=kms_env.store_id, origin="AWS_CLOUDHSM")
    )
    assert meta.key_state is KeyState.ENABLED
    backend = svc.ctx.connections.peek(kms_env.store_id)
    assert [k.label for k in backend.find_keys(meta.arn)] == [meta.arn]


def test_fake_env_smoke(fake_env):
    svc = fake_env.svc
    store = svc.keystores.describe(ADMIN, fake_env.store_id).items[0]
    assert store.connection_state is ConnectionState.CONNECTED
    meta = svc.keys.create(
        ADMIN, CreateKeyRequest(custom_key_store_id=fake_env.store_id, origin="AWS_CLOUDHSM")
    )
    assert meta.key_state is KeyState.ENABLED
    backend = svc.ctx.connections.peek(fake_env.store_id)
    assert [k.label for k in backend.find_keys(meta.arn)] == [meta.arn]
    blob = svc.crypto.encrypt(ADMIN, meta.key_id, b"kept").ciphertext_blob
    svc = fake_env.restart()  # a new service and connector over the same files and token
    assert svc.crypto.decrypt(ADMIN, blob).plaintext == b"kept"
