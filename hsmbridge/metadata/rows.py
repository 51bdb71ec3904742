"""Mapping between metadata rows and hsmbridge's records (enums as their string values, tags
as a JSON column), for every engine: a row is anything indexable by column name (sqlite3.Row,
psycopg's dict rows). Pure; must not import a database driver, keystore, backend, service,
protocol, http or cli.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from hsmbridge.metadata.store import DeletedKey, StoredKeyStore
from hsmbridge.model import (
    Alias,
    ConnectionErrorCode,
    ConnectionState,
    CustomKeyStore,
    CustomKeyStoreType,
    Grant,
    GrantConstraints,
    KeyLifecycle,
    KeyRecord,
    KeySpec,
    KeyState,
    KeyUsage,
    Origin,
    Tag,
)


class Row(Protocol):
    def __getitem__(self, column: str, /) -> Any: ...


def to_key_store(row: Row) -> StoredKeyStore:
    code = row["connection_error_code"]
    store = CustomKeyStore(
        store_id=row["id"],
        name=row["name"],
        cluster_id=row["cluster_id"],
        trust_anchor_pem=row["trust_anchor_pem"],
        connection_state=ConnectionState(row["connection_state"]),
        creation_date=row["creation_date"],
        connection_error_code=ConnectionErrorCode(code) if code is not None else None,
        store_type=CustomKeyStoreType(row["store_type"]),
    )
    return StoredKeyStore(store=store, password_blob=bytes(row["password_blob"]))


def key_values(r: KeyRecord) -> dict[str, Any]:
    return {
        "id": r.key_id,
        "arn": r.arn,
        "account_id": r.account_id,
        "region": r.region,
        "custom_key_store_id": r.custom_key_store_id,
        "cluster_id": r.cluster_id,
        "description": r.description,
        "base_state": r.base_state.value,
        "creation_date": r.creation_date,
        "policy": r.policy,
        "lifecycle": r.lifecycle.value,
        "deletion_date": r.deletion_date,
        "pending_window_days": r.pending_window_days,
        "key_usage": r.key_usage.value,
        "key_spec": r.key_spec.value,
        "origin": r.origin.value,
        # a list of pairs keeps the caller's tag order
        "tags": json.dumps([[t.key, t.value] for t in r.tags]),
    }


def to_key(row: Row) -> KeyRecord:
    return KeyRecord(
        key_id=row["id"],
        arn=row["arn"],
        account_id=row["account_id"],
        region=row["region"],
        custom_key_store_id=row["custom_key_store_id"],
        cluster_id=row["cluster_id"],
        description=row["description"],
        base_state=KeyState(row["base_state"]),
        creation_date=row["creation_date"],
        policy=row["policy"],
        lifecycle=KeyLifecycle(row["lifecycle"]),
        deletion_date=row["deletion_date"],
        pending_window_days=row["pending_window_days"],
        key_usage=KeyUsage(row["key_usage"]),
        key_spec=KeySpec(row["key_spec"]),
        origin=Origin(row["origin"]),
        tags=tuple(Tag(k, v) for k, v in json.loads(row["tags"])),
    )


def to_alias(row: Row) -> Alias:
    return Alias(
        name=row["name"],
        arn=row["arn"],
        target_key_id=row["key_id"],
        creation_date=row["creation_date"],
        last_updated_date=row["last_updated_date"],
    )


def to_deleted_key(row: Row) -> DeletedKey:
    return DeletedKey(
        key_id=row["key_id"],
        arn=row["arn"],
        custom_key_store_id=row["custom_key_store_id"],
        cluster_id=row["cluster_id"],
        deleted_at=row["deleted_at"],
        material_deleted=bool(row["material_deleted"]),
    )


def _pairs(raw: Any) -> tuple[tuple[str, str], ...] | None:
    return None if raw is None else tuple((str(k), str(v)) for k, v in raw)


def grant_params(grant: Grant) -> tuple[Any, ...]:
    c = grant.constraints
    constraints = (
        None
        if c is None
        else json.dumps(
            {
                "equals": None if c.equals is None else [list(p) for p in c.equals],
                "subset": None if c.subset is None else [list(p) for p in c.subset],
            }
        )
    )
    return (
        grant.grant_id,
        grant.key_id,
        grant.key_arn,
        grant.name,
        grant.grantee_principal,
        grant.retiring_principal,
        grant.issuing_account,
        json.dumps(list(grant.operations)),
        constraints,
        grant.creation_date,
    )


def to_grant(row: Row) -> Grant:
    raw = json.loads(row["constraints"]) if row["constraints"] else None
    return Grant(
        grant_id=row["id"],
        key_id=row["key_id"],
        key_arn=row["key_arn"],
        name=row["name"],
        grantee_principal=row["grantee_principal"],
        retiring_principal=row["retiring_principal"],
        issuing_account=row["issuing_account"],
        operations=tuple(json.loads(row["operations"])),
        constraints=None
        if raw is None
        else GrantConstraints(_pairs(raw["equals"]), _pairs(raw["subset"])),
        creation_date=row["creation_date"],
    )
