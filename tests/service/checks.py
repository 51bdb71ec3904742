"""Assertions shared by the service tests: what the token holds versus what the metadata says.

Everything here reads real state: the metadata rows of every lifecycle through the SQLite store,
the token through our backend's batched scan (the in-memory token on a fake env), and, on a
SoftHSM2 env only, independently through OpenSC's pkcs11-tool in another process (so a bug in our
attribute reader or object enumeration cannot hide a bug in our key template or a duplicate
label). `assert_consistent` and the pkcs11-tool readers therefore need a SoftHSM2 env.
"""

from __future__ import annotations

from collections import Counter

from hsmbridge.backend import HsmBackend
from hsmbridge.model import KeyLifecycle, KeyRecord
from tests import pkcs11_tool
from tests.harness import KmsEnv


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
    """Secret-key labels on the env's token as our backend enumerates them, with counts."""
    return Counter(k.label for k in backend(env).list_keys())


def pkcs11_tool_labels(env: KmsEnv) -> Counter[str]:
    """Secret-key labels on the env's token as pkcs11-tool (another process) lists them."""
    return pkcs11_tool.secret_key_labels(env.token_label, env.password)


def assert_labels_match_metadata(labels: Counter[str], live: set[str], witness: str) -> None:
    """Every LIVE ARN labels exactly one HSM key; every HSM key is a LIVE key's."""
    counts = {arn: labels[arn] for arn in live}
    assert counts == dict.fromkeys(live, 1), f"{witness}: LIVE keys by object count: {counts}"
    assert set(labels) <= live, f"{witness}: orphan material: {set(labels) - live}"


def assert_nothing_created(env: KmsEnv) -> None:
    """No key row of any lifecycle in the env's store and no key object on its token (as our
    backend lists it: the fake's objects on a fake env, SoftHSM's on a SoftHSM one)."""
    assert rows(env) == []
    assert sum(hsm_labels(env).values()) == 0


def assert_consistent(env: KmsEnv) -> None:
    """No key material without a LIVE record, no LIVE record without exactly one HSM key, no
    intent row left; checked against the token as our backend sees it and as pkcs11-tool does."""
    records = rows(env)
    live = {r.arn for r in records if r.lifecycle is KeyLifecycle.LIVE}
    ours, witness = hsm_labels(env), pkcs11_tool_labels(env)
    assert_labels_match_metadata(witness, live, "pkcs11-tool")
    assert_labels_match_metadata(ours, live, "our backend")
    assert ours == witness, "our backend and pkcs11-tool disagree about the token"
    assert all(r.lifecycle is KeyLifecycle.LIVE for r in records)


def pkcs11_tool_secret_keys(env: KmsEnv) -> dict[str, dict[str, object]]:
    """`pkcs11-tool --list-objects --type secrkey` on the env's token, by label (fails the test
    if a label repeats: see `pkcs11_tool.secret_key_objects` for the list)."""
    return pkcs11_tool.secret_keys(env.token_label, env.password)
