"""The explicit table of supported KMS operations: name → handler over the KmsService.

Owns: `build_operations()`, one literal entry per supported operation (no getattr on request
data), each decoding validated params into a service call and encoding the result with `codec`.
Operations KMS has but hsmbridge does not implement are answered by `app.py` as
UnsupportedOperationException; the rotation operations are here because KMS itself refuses them
for custom key store keys, and Sign, Verify, GenerateMac and VerifyMac because KMS refuses them
for a symmetric encryption key (InvalidKeyUsageException, after finding the key). The
`Recipient` member (a Nitro Enclaves attestation document) is refused: hsmbridge cannot verify
one, and KMS would withhold the plaintext for it. Must not import uvicorn, backend or pkcs11.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from hsmbridge.errors import UnsupportedOperationException, ValidationException
from hsmbridge.protocol import codec
from hsmbridge.request import RequestContext
from hsmbridge.service.grants import CreateGrantRequest
from hsmbridge.service.keys import CreateKeyRequest
from hsmbridge.service.kms import KmsService

P = dict[str, Any]
C = RequestContext
# Synchronous on purpose: handlers talk to an HSM and may block; the HTTP edge runs them in
# worker threads.
Handler = Callable[[RequestContext, P], P]

# The operations whose handlers may call an HSM (or wait for one: a disconnect logs out). The
# HTTP edge runs them apart from the rest, so a slow HSM never delays metadata operations.
HSM_OPERATIONS: Final = frozenset(
    {
        "CreateKey",
        "Decrypt",
        "DisconnectCustomKeyStore",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "ReEncrypt",
    }
)
# The cryptographic ones among them: no state changes before their HSM calls, each call a few
# microseconds on a local library, so the edge may try them on its event loop first
# (`hsmbridge.nowait`). CreateKey writes metadata before its key exists and a disconnect logs
# out: both always run on a worker thread.
INLINE_OPERATIONS: Final = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
        "ReEncrypt",
    }
)


def _keystore_handlers(s: KmsService) -> dict[str, Handler]:
    ks = s.keystores

    def describe(c: C, p: P) -> P:
        page = ks.describe(
            c,
            p.get("CustomKeyStoreId"),
            p.get("CustomKeyStoreName"),
            p.get("Limit"),
            p.get("Marker"),
        )
        return codec.page(
            page, "CustomKeyStores", "NextMarker", [codec.custom_key_store(x) for x in page.items]
        )

    def update(c: C, p: P) -> P:
        ks.update(
            c,
            p["CustomKeyStoreId"],
            new_name=p.get("NewCustomKeyStoreName"),
            password=p.get("KeyStorePassword"),
            cluster_id=p.get("CloudHsmClusterId"),
        )
        return {}

    return {
        "CreateCustomKeyStore": lambda c, p: {
            "CustomKeyStoreId": ks.create(
                c,
                p["CustomKeyStoreName"],
                codec.require(p, "CloudHsmClusterId"),
                codec.require(p, "TrustAnchorCertificate"),
                codec.require(p, "KeyStorePassword"),
            )
            if p.get("CustomKeyStoreType", "AWS_CLOUDHSM") == "AWS_CLOUDHSM"
            else _no_xks()
        },
        "DescribeCustomKeyStores": describe,
        "ConnectCustomKeyStore": _no_output(lambda c, p: ks.connect(c, p["CustomKeyStoreId"])),
        "DisconnectCustomKeyStore": _no_output(
            lambda c, p: ks.disconnect(c, p["CustomKeyStoreId"])
        ),
        "UpdateCustomKeyStore": update,
        "DeleteCustomKeyStore": _no_output(lambda c, p: ks.delete(c, p["CustomKeyStoreId"])),
    }


def _no_output(fn: Callable[[C, P], object]) -> Handler:
    """For operations whose KMS response has no members: run, then answer `{}`."""

    def handler(c: C, p: P) -> P:
        fn(c, p)
        return {}

    return handler


def _no_xks() -> str:
    raise UnsupportedOperationException(
        "External key stores (EXTERNAL_KEY_STORE) are not supported; hsmbridge serves AWS_CLOUDHSM "
        "custom key stores."
    )


def _key_handlers(s: KmsService) -> dict[str, Handler]:
    keys = s.keys

    def create(c: C, p: P) -> P:
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
        return {"KeyMetadata": codec.key_metadata(keys.create(c, req))}

    def list_keys(c: C, p: P) -> P:
        page = keys.list(c, p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Keys", "NextMarker", [codec.key_list_entry(k) for k in page.items])

    def schedule(c: C, p: P) -> P:
        r = keys.schedule_deletion(c, p["KeyId"], p.get("PendingWindowInDays"))
        return {
            "KeyId": r.arn,
            "DeletionDate": codec.timestamp(r.deletion_date),
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": r.pending_window_days,
        }

    def unsupported_rotation(operation: str) -> Handler:
        def handler(c: C, p: P) -> P:
            keys.refuse_rotation(c, p["KeyId"], f"kms:{operation}")

        return handler

    return {
        "CreateKey": create,
        "DescribeKey": lambda c, p: {
            "KeyMetadata": codec.key_metadata(keys.describe(c, p["KeyId"]))
        },
        "ListKeys": list_keys,
        "EnableKey": _no_output(lambda c, p: keys.enable(c, p["KeyId"])),
        "DisableKey": _no_output(lambda c, p: keys.disable(c, p["KeyId"])),
        "ScheduleKeyDeletion": schedule,
        "CancelKeyDeletion": lambda c, p: {"KeyId": keys.cancel_deletion(c, p["KeyId"]).arn},
        "UpdateKeyDescription": _no_output(
            lambda c, p: keys.update_description(c, p["KeyId"], p["Description"])
        ),
        "GetKeyRotationStatus": unsupported_rotation("GetKeyRotationStatus"),
        "EnableKeyRotation": unsupported_rotation("EnableKeyRotation"),
        "DisableKeyRotation": unsupported_rotation("DisableKeyRotation"),
    }


def _alias_tag_policy_handlers(s: KmsService) -> dict[str, Handler]:
    al, tg, po = s.aliases, s.tags, s.policies

    def list_aliases(c: C, p: P) -> P:
        page = al.list(c, p.get("KeyId"), p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Aliases", "NextMarker", [codec.alias(a) for a in page.items])

    def list_tags(c: C, p: P) -> P:
        page = tg.list(c, p["KeyId"], p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Tags", "NextMarker", [codec.tag(t) for t in page.items])

    def list_policies(c: C, p: P) -> P:
        page = po.list(c, p["KeyId"])
        return {"PolicyNames": list(page.items), "Truncated": False}

    return {
        "CreateAlias": _no_output(lambda c, p: al.create(c, p["AliasName"], p["TargetKeyId"])),
        "UpdateAlias": _no_output(lambda c, p: al.update(c, p["AliasName"], p["TargetKeyId"])),
        "DeleteAlias": _no_output(lambda c, p: al.delete(c, p["AliasName"])),
        "ListAliases": list_aliases,
        "TagResource": _no_output(lambda c, p: tg.tag(c, p["KeyId"], codec.tags_in(p["Tags"]))),
        "UntagResource": _no_output(lambda c, p: tg.untag(c, p["KeyId"], tuple(p["TagKeys"]))),
        "ListResourceTags": list_tags,
        "GetKeyPolicy": lambda c, p: {
            "Policy": po.get(c, p["KeyId"], p.get("PolicyName")),
            "PolicyName": p.get("PolicyName") or "default",
        },
        "PutKeyPolicy": _no_output(
            lambda c, p: po.put(
                c,
                p["KeyId"],
                p.get("PolicyName"),
                p["Policy"],
                bypass_lockout_check=bool(p.get("BypassPolicyLockoutSafetyCheck")),
            )
        ),
        "ListKeyPolicies": list_policies,
    }


def _crypto_handlers(s: KmsService) -> dict[str, Handler]:
    cr = s.crypto

    def encrypt(c: C, p: P) -> P:
        out = cr.encrypt(
            c,
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

    def decrypt(c: C, p: P) -> P:
        _refuse_recipient(p)
        out = cr.decrypt(
            c,
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

    def re_encrypt(c: C, p: P) -> P:
        out = cr.re_encrypt(
            c,
            codec.require(p, "CiphertextBlob"),
            p["DestinationKeyId"],
            source_key_ref=p.get("SourceKeyId"),
            source_context=codec.context_in(p.get("SourceEncryptionContext")),
            destination_context=codec.context_in(p.get("DestinationEncryptionContext")),
            source_algorithm=p.get("SourceEncryptionAlgorithm"),
            destination_algorithm=p.get("DestinationEncryptionAlgorithm"),
            dry_run=bool(p.get("DryRun")),
        )
        return {
            "CiphertextBlob": out.ciphertext_blob,
            "SourceKeyId": out.source_key_arn,
            "KeyId": out.key_arn,
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def data_key(with_plaintext: bool) -> Handler:
        def handler(c: C, p: P) -> P:
            if with_plaintext:
                _refuse_recipient(p)
            out = cr.generate_data_key(
                c,
                p["KeyId"],
                without_plaintext=not with_plaintext,
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

    def generate_random(c: C, p: P) -> P:
        _refuse_recipient(p)
        return {
            "Plaintext": cr.generate_random(c, p.get("NumberOfBytes"), p.get("CustomKeyStoreId"))
        }

    def wrong_key_usage(operation: str) -> Handler:
        def handler(c: C, p: P) -> P:
            cr.refuse_key_usage(c, p["KeyId"], operation)

        return handler

    return {
        "Encrypt": encrypt,
        "Decrypt": decrypt,
        "ReEncrypt": re_encrypt,
        "GenerateDataKey": data_key(True),
        "GenerateDataKeyWithoutPlaintext": data_key(False),
        "GenerateRandom": generate_random,
        "Sign": wrong_key_usage("Sign"),
        "Verify": wrong_key_usage("Verify"),
        "GenerateMac": wrong_key_usage("GenerateMac"),
        "VerifyMac": wrong_key_usage("VerifyMac"),
    }


def _refuse_recipient(p: P) -> None:
    """NOTE: KMS verifies the attestation document and returns the plaintext only encrypted to
    its public key (CiphertextForRecipient). hsmbridge cannot verify one, so rather than return
    the plaintext in the clear it refuses the request."""
    if p.get("Recipient") is not None:
        raise ValidationException(
            "Recipient is not supported: this KMS endpoint (hsmbridge) cannot verify a Nitro "
            "Enclaves attestation document and does not return plaintext for one."
        )


def _grant_handlers(s: KmsService) -> dict[str, Handler]:
    gr = s.grants

    def create(c: C, p: P) -> P:
        issued = gr.create(
            c,
            CreateGrantRequest(
                key_ref=p["KeyId"],
                grantee_principal=p.get("GranteePrincipal"),
                operations=tuple(p.get("Operations") or ()),
                retiring_principal=p.get("RetiringPrincipal"),
                constraints=p.get("Constraints"),
                name=p.get("Name"),
                grantee_service_principal=p.get("GranteeServicePrincipal"),
                retiring_service_principal=p.get("RetiringServicePrincipal"),
                dry_run=bool(p.get("DryRun")),
            ),
        )
        return {"GrantToken": issued.grant_token, "GrantId": issued.grant_id}

    def list_grants(c: C, p: P) -> P:
        page = gr.list(
            c,
            p["KeyId"],
            p.get("Limit"),
            p.get("Marker"),
            grant_id=p.get("GrantId"),
            grantee=p.get("GranteePrincipal"),
        )
        return codec.page(page, "Grants", "NextMarker", [codec.grant(g) for g in page.items])

    def list_retirable(c: C, p: P) -> P:
        # Optional in the model (it was required once); KMS cannot answer without it.
        principal = codec.require(p, "RetiringPrincipal")
        page = gr.list_retirable(c, principal, p.get("Limit"), p.get("Marker"))
        return codec.page(page, "Grants", "NextMarker", [codec.grant(g) for g in page.items])

    return {
        "CreateGrant": create,
        "ListGrants": list_grants,
        "ListRetirableGrants": list_retirable,
        "RetireGrant": _no_output(
            lambda c, p: gr.retire(
                c,
                grant_token=p.get("GrantToken"),
                key_ref=p.get("KeyId"),
                grant_id=p.get("GrantId"),
                dry_run=bool(p.get("DryRun")),
            )
        ),
        "RevokeGrant": _no_output(
            lambda c, p: gr.revoke(c, p["KeyId"], p["GrantId"], dry_run=bool(p.get("DryRun")))
        ),
    }


def build_operations(service: KmsService) -> dict[str, Handler]:
    """Every supported operation, keyed by its KMS operation name."""
    return {
        **_keystore_handlers(service),
        **_key_handlers(service),
        **_alias_tag_policy_handlers(service),
        **_crypto_handlers(service),
        **_grant_handlers(service),
    }


def dispatch(
    operations: Mapping[str, Handler], caller: RequestContext, name: str, params: Mapping[str, Any]
) -> P:
    """Validate `params` as the HTTP edge would and run one operation as `caller` (the CLI)."""
    from hsmbridge.protocol.validation import validate_input

    typed = validate_input(name, dict(params))
    return operations[name](caller, typed)
