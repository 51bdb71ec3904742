"""KMS JSON field names ↔ hsmbridge's domain objects. The only place wire names are spelled.

Owns: encoding domain results (KeyMetadata, CustomKeyStore, Alias, Tag, pages) as the dicts KMS
returns, and reading request members into domain values. Blobs stay `bytes` here; the JSON
encoder of `protocol/errors.py` base64-encodes them. Must not import uvicorn, backend or pkcs11.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hsmbridge.errors import ValidationException
from hsmbridge.model import Alias, CustomKeyStore, Grant, KeyIdentity, KeyMetadata, Page, Tag

Json = dict[str, Any]
TIMESTAMP_DIGITS = 3  # KMS sends epoch seconds with millisecond precision


def timestamp(epoch_seconds: float) -> float:
    """A wire timestamp: epoch seconds rounded to milliseconds, as KMS sends them
    (`1795919210.005`, never the stored `1795919210.0051818`)."""
    return round(epoch_seconds, TIMESTAMP_DIGITS)


def key_metadata(m: KeyMetadata) -> Json:
    out: Json = {
        "AWSAccountId": m.aws_account_id,
        "KeyId": m.key_id,
        "Arn": m.arn,
        "CreationDate": timestamp(m.creation_date),
        "Enabled": m.enabled,
        "Description": m.description,
        "KeyUsage": m.key_usage.value,
        "KeyState": m.key_state.value,
        "Origin": m.origin.value,
        "CustomKeyStoreId": m.custom_key_store_id,
        "CloudHsmClusterId": m.cloud_hsm_cluster_id,
        "KeyManager": m.key_manager,
        "CustomerMasterKeySpec": m.key_spec.value,
        "KeySpec": m.key_spec.value,
        "EncryptionAlgorithms": list(m.encryption_algorithms),
        "MultiRegion": m.multi_region,
    }
    if m.deletion_date is not None:
        out["DeletionDate"] = timestamp(m.deletion_date)
    return out


def custom_key_store(s: CustomKeyStore) -> Json:
    out: Json = {
        "CustomKeyStoreId": s.store_id,
        "CustomKeyStoreName": s.name,
        "CloudHsmClusterId": s.cluster_id,
        "TrustAnchorCertificate": s.trust_anchor_pem,
        "ConnectionState": s.connection_state.value,
        "CreationDate": timestamp(s.creation_date),
        "CustomKeyStoreType": s.store_type.value,
    }
    if s.connection_error_code is not None:
        out["ConnectionErrorCode"] = s.connection_error_code.value
    return out


def alias(a: Alias) -> Json:
    return {
        "AliasName": a.name,
        "AliasArn": a.arn,
        "TargetKeyId": a.target_key_id,
        "CreationDate": timestamp(a.creation_date),
        "LastUpdatedDate": timestamp(a.last_updated_date),
    }


def grant(g: Grant) -> Json:
    """A GrantListEntry."""
    out: Json = {
        "KeyId": g.key_arn,
        "GrantId": g.grant_id,
        "CreationDate": timestamp(g.creation_date),
        "GranteePrincipal": g.grantee_principal,
        "IssuingAccount": g.issuing_account,
        "Operations": list(g.operations),
    }
    if g.name:
        out["Name"] = g.name
    if g.retiring_principal is not None:
        out["RetiringPrincipal"] = g.retiring_principal
    c = g.constraints
    if c is not None and c.equals is not None:
        out["Constraints"] = {"EncryptionContextEquals": dict(c.equals)}
    elif c is not None and c.subset is not None:
        out["Constraints"] = {"EncryptionContextSubset": dict(c.subset)}
    return out


def key_list_entry(r: KeyIdentity) -> Json:
    return {"KeyId": r.key_id, "KeyArn": r.arn}


def tag(t: Tag) -> Json:
    return {"TagKey": t.key, "TagValue": t.value}


def page(p: Page[Any], items_name: str, marker_name: str, items: list[Json]) -> Json:
    out: Json = {items_name: items, "Truncated": p.truncated}
    if p.next_marker is not None:
        out[marker_name] = p.next_marker
    return out


def tags_in(raw: Any) -> tuple[Tag, ...]:
    if raw is None:
        return ()
    return tuple(Tag(t["TagKey"], t["TagValue"]) for t in raw)


def context_in(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """EncryptionContext; the model types values as strings (validation already enforced it)."""
    return dict(raw or {})


def dry_run_ignores_ciphertext(params: Mapping[str, Any]) -> bool:
    return "IGNORE_CIPHERTEXT" in (params.get("DryRunModifiers") or [])


def require(params: Mapping[str, Any], name: str) -> Any:
    """Members the model marks optional but the operation needs (e.g. GenerateRandom's)."""
    if params.get(name) is None:
        raise ValidationException(
            f"1 validation error detected: Value null at '{name[0].lower()}{name[1:]}' "
            "failed to satisfy constraint: Member must not be null"
        )
    return params[name]
