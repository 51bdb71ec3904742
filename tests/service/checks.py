"""Assertions shared by the service tests: what the token holds versus what the metadata says.

Everything here reads real state: the metadata rows of every lifecycle through the SQLite store,
the token through our backend's batched scan, and, independently, through OpenSC's pkcs11-tool in
another process (so a bug in our attribute reader cannot hide a bug in our key template).
"""

from __future__ import annotations

from collections import Counter

from hsmbridge.backend import HsmBackend
from hsmbridge.model import KeyLifecycle, KeyRecord
from tests import pkcs11_tool
from tests.harness import KmsEnv

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def backend(env: KmsEnv) -> HsmBackend:
    """The service's live login for the env's store (logs in lazily, as a request would)."""
    assert env.store_id is not None
    row = env.svc.ctx.store_row(env.store_id)
    return env.svc.ctx.connections.get(
        env.store_id, row.store.cluster_id, lambda: env.svc.ctx.password_of(row)
    )


def rows(env: KmsEnv) -> list[KeyRecord]:
    """Every key row of the env's store, whatever its lifecycle (CREATING, LIVE, DELETING)."""
    assert env.store_id is not None
    return env.svc.ctx.meta.keys_in_store(env.store_id)


def hsm_labels(env: KmsEnv) -> Counter[str]:
    return Counter(k.label for k in backend(env).list_keys())


def assert_consistent(env: KmsEnv) -> None:
    """No key material without a LIVE record, no LIVE record without exactly one HSM key."""
    live = {r.arn for r in rows(env) if r.lifecycle is KeyLifecycle.LIVE}
    labels = hsm_labels(env)
    assert {arn: labels[arn] for arn in live} == dict.fromkeys(live, 1)
    assert set(labels) <= live, f"orphan material: {set(labels) - live}"
    assert all(r.lifecycle is KeyLifecycle.LIVE for r in rows(env))


def pkcs11_tool_secret_keys(env: KmsEnv) -> dict[str, dict[str, object]]:
    """`pkcs11-tool --list-objects --type secrkey` on the env's token, parsed by label."""
    return pkcs11_tool.secret_keys(env.token_label, env.password)
