"""The explicit table of supported KMS operations: name → handler over the KmsService.

Owns: `build_operations()`, one literal entry per supported operation (no getattr on request
data), each decoding validated params into a service call and encoding the result with `codec`.
Operations KMS has but hsmbridge does not implement are answered by `app.py` as
UnsupportedOperationException; the rotation operations are here because KMS itself refuses them
for custom key store keys. Must not import uvicorn, backend or pkcs11.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hsmbridge.api import codec
from hsmbridge.api.app import Handler, RequestContext
from hsmbridge.errors import AccessDeniedException, UnsupportedOperationException
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService

P = dict[str, Any]


def _keystore_handlers(s: KmsService) -> dict[str, Callable[[P], P]]:
    ks = s.keystores

    def describe(p: P) -> P:
        page = ks.describe(
            p.get("CustomKeyStoreId"), p.get("CustomKeyStoreName"), p.get("Limit"), p.get("Marker")
        )
        return codec.page(
            page, "CustomKeyStores", "NextMarker", [codec.custom_key_store(x) for x in page.items]
        )

    def update(p: P) -> P:
        ks.update(
            p["CustomKeyStoreId"],
            new_name=p.get("NewCustomKeyStoreName"),
            password=p.get("KeyStorePassword"),
            cluster_id=p.get("CloudHsmClusterId"),
        )
        return {}

    return {
        "CreateCustomKeyStore": lambda p: {
            "CustomKeyStoreId": ks.create(
                p["CustomKeyStoreName"],
                codec.require(p, "CloudHsmClusterId"),
                codec.require(p, "TrustAnchorCertificate"),
                codec.require(p, "KeyStorePassword"),
            )
            if p.get("CustomKeyStoreType", "AWS_CLOUDHSM") == "AWS_CLOUDHSM"
            else _no_xks()
        },
        "DescribeCustomKeyStores": describe,
        "ConnectCustomKeyStore": _no_output(lambda p: ks.connect(p["CustomKeyStoreId"])),
        "DisconnectCustomKeyStore": _no_output(lambda p: ks.disconnect(p["CustomKeyStoreId"])),
        "UpdateCustomKeyStore": update,
        "DeleteCustomKeyStore": _no_output(lambda p: ks.delete(p["CustomKeyStoreId"])),
    }


def _no_output(fn: Callable[[P], object]) -> Callable[[P], P]:
    """For operations whose KMS response has no members: run, then answer `{}`."""

    def handler(p: P) -> P:
        fn(p)
        return {}

    return handler


def _no_xks() -> str:
    raise UnsupportedOperationException(
        "External key stores (EXTERNAL_KEY_STORE) are not supported; hsmbridge serves AWS_CLOUDHSM "
        "custom key stores."
    )


def _key_handlers(s: KmsService) -> dict[str, Callable[[P], P]]:
    keys = s.keys

    def create(p: P) -> P:
        req = CreateKeyRequest(
            custom_key_store_id=p.get("CustomKeyStoreId"),
            origin=p.get("Origin"),
            description=p.get("Description", ""),
            key_usage=p.get("KeyUsage"),
            key_spec=p.get("KeySpec"),
            customer_master_key_spec=p.get("CustomerMasterKeySpec"),
            multi_region=p.get("MultiRegion"),
            xks_key_id=p.get("XksKeyId"),
            policy=p.get("Policy"),
            bypass_policy_lockout_safety_check=bool(p.get("BypassPolicyLockoutSafetyCheck")),
            tags=codec.tags_in(p.get("Tags")),
        )
        return {"KeyMetadata": codec.key_metadata(keys.create(req))}

    def list_keys(p: P) -> P:
        page = keys.list(p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Keys", "NextMarker", [codec.key_list_entry(k) for k in page.items])

    def schedule(p: P) -> P:
        r = keys.schedule_deletion(p["KeyId"], p.get("PendingWindowInDays"))
        return {
            "KeyId": r.arn,
            "DeletionDate": r.deletion_date,
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": r.pending_window_days,
        }

    def unsupported_rotation(p: P) -> P:
        record = s.lookup.resolve(p["KeyId"], allow_alias=False)
        raise UnsupportedOperationException(
            f"{record.arn} is in a custom key store; automatic key rotation is not supported "
            "for KMS keys in custom key stores."
        )

    return {
        "CreateKey": create,
        "DescribeKey": lambda p: {"KeyMetadata": codec.key_metadata(keys.describe(p["KeyId"]))},
        "ListKeys": list_keys,
        "EnableKey": _no_output(lambda p: keys.enable(p["KeyId"])),
        "DisableKey": _no_output(lambda p: keys.disable(p["KeyId"])),
        "ScheduleKeyDeletion": schedule,
        "CancelKeyDeletion": lambda p: {"KeyId": keys.cancel_deletion(p["KeyId"]).arn},
        "UpdateKeyDescription": _no_output(
            lambda p: keys.update_description(p["KeyId"], p["Description"])
        ),
        "GetKeyRotationStatus": unsupported_rotation,
        "EnableKeyRotation": unsupported_rotation,
        "DisableKeyRotation": unsupported_rotation,
    }


def _alias_tag_policy_handlers(s: KmsService) -> dict[str, Callable[[P], P]]:
    al, tg, po = s.aliases, s.tags, s.policies

    def list_aliases(p: P) -> P:
        page = al.list(p.get("KeyId"), p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Aliases", "NextMarker", [codec.alias(a) for a in page.items])

    def list_tags(p: P) -> P:
        page = tg.list(p["KeyId"], p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Tags", "NextMarker", [codec.tag(t) for t in page.items])

    def list_policies(p: P) -> P:
        page = po.list(p["KeyId"])
        return {"PolicyNames": list(page.items), "Truncated": False}

    return {
        "CreateAlias": _no_output(lambda p: al.create(p["AliasName"], p["TargetKeyId"])),
        "UpdateAlias": _no_output(lambda p: al.update(p["AliasName"], p["TargetKeyId"])),
        "DeleteAlias": _no_output(lambda p: al.delete(p["AliasName"])),
        "ListAliases": list_aliases,
        "TagResource": _no_output(lambda p: tg.tag(p["KeyId"], codec.tags_in(p["Tags"]))),
        "UntagResource": _no_output(lambda p: tg.untag(p["KeyId"], tuple(p["TagKeys"]))),
        "ListResourceTags": list_tags,
        "GetKeyPolicy": lambda p: {
            "Policy": po.get(p["KeyId"], p.get("PolicyName")),
            "PolicyName": p.get("PolicyName") or "default",
        },
        "PutKeyPolicy": _no_output(lambda p: po.put(p["KeyId"], p.get("PolicyName"), p["Policy"])),
        "ListKeyPolicies": list_policies,
    }


def _crypto_handlers(s: KmsService) -> dict[str, Callable[[P], P]]:
    cr = s.crypto

    def encrypt(p: P) -> P:
        out = cr.encrypt(
            p["KeyId"],
            p["Plaintext"],
            context=codec.context_in(p.get("EncryptionContext")),
            algorithm=p.get("EncryptionAlgorithm"),
            dry_run=bool(p.get("DryRun")),
        )
        return {
            "CiphertextBlob": out.ciphertext_blob,
            "KeyId": out.key_arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def decrypt(p: P) -> P:
        out = cr.decrypt(
            codec.require(p, "CiphertextBlob"),
            key_ref=p.get("KeyId"),
            context=codec.context_in(p.get("EncryptionContext")),
            algorithm=p.get("EncryptionAlgorithm"),
            dry_run=bool(p.get("DryRun")),
        )
        return {
            "KeyId": out.key_arn,
            "Plaintext": out.plaintext,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def re_encrypt(p: P) -> P:
        out = cr.re_encrypt(
            codec.require(p, "CiphertextBlob"),
            p["DestinationKeyId"],
            source_key_ref=p.get("SourceKeyId"),
            source_context=codec.context_in(p.get("SourceEncryptionContext")),
            destination_context=codec.context_in(p.get("DestinationEncryptionContext")),
            dry_run=bool(p.get("DryRun")),
        )
        return {
            "CiphertextBlob": out.ciphertext_blob,
            "SourceKeyId": out.source_key_arn,
            "KeyId": out.key_arn,
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def data_key(with_plaintext: bool) -> Callable[[P], P]:
        def handler(p: P) -> P:
            out = cr.generate_data_key(
                p["KeyId"],
                key_spec=p.get("KeySpec"),
                number_of_bytes=p.get("NumberOfBytes"),
                context=codec.context_in(p.get("EncryptionContext")),
                dry_run=bool(p.get("DryRun")),
            )
            result: P = {"CiphertextBlob": out.ciphertext_blob, "KeyId": out.key_arn}
            if with_plaintext:
                result["Plaintext"] = out.plaintext
            return result

        return handler

    return {
        "Encrypt": encrypt,
        "Decrypt": decrypt,
        "ReEncrypt": re_encrypt,
        "GenerateDataKey": data_key(True),
        "GenerateDataKeyWithoutPlaintext": data_key(False),
        "GenerateRandom": lambda p: {
            "Plaintext": cr.generate_random(p.get("NumberOfBytes"), p.get("CustomKeyStoreId"))
        },
    }


def build_operations(service: KmsService) -> dict[str, Handler]:
    """Every supported operation, keyed by its KMS operation name."""
    plain: dict[str, Callable[[P], P]] = {
        **_keystore_handlers(service),
        **_key_handlers(service),
        **_alias_tag_policy_handlers(service),
        **_crypto_handlers(service),
    }
    account = service.ctx.settings.account_id
    return {name: _with_context(fn, account) for name, fn in plain.items()}


def _with_context(fn: Callable[[P], P], account_id: str) -> Handler:
    def handler(ctx: RequestContext, params: P) -> P:
        # NOTE: differs from KMS, which serves every account; one hsmbridge endpoint holds the
        # keys of the one account in its configuration, so other accounts' principals are denied.
        if ctx.principal is not None and ctx.principal.account_id != account_id:
            raise AccessDeniedException(
                f"{ctx.principal.arn} is not authorized to perform kms:{ctx.operation}: this "
                f"endpoint serves account {account_id} only."
            )
        return fn(params)

    return handler


def dispatch(operations: Mapping[str, Handler], name: str, params: Mapping[str, Any]) -> P:
    """Validate `params` as the HTTP edge would and run one operation (used by the CLI)."""
    from hsmbridge.api.validation import validate_input

    typed = validate_input(name, dict(params))
    return operations[name](RequestContext("cli", None, None, name, "hsmbridge-cli"), typed)
