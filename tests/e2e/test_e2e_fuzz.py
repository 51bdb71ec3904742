"""Property-based test of the HTTP edge and the operations behind it, driven by botocore's model.

For every implemented operation, hypothesis builds request documents from the operation's input
shape: strings inside and outside their length limits, enum values and non-members, random and
invalid base64 blobs, integers around their bounds, missing required members and wrong JSON types,
mixed with known-good identifiers so requests also get past validation into the service. Each is
sent as raw signed JSON (botocore's SigV4Auth + urllib3: boto3 would refuse invalid types before
sending). Every answer must be a 200 that validates against the output shape, or an error the
model lists for the operation (or a common error), and never a KMSInternalException or a
traceback.

Each operation also has one known-good request (`GOOD`), run by hypothesis as an explicit
`@example` before the generated ones: it must get past shape validation into the service. Left to
the generator this was chance (GenerateDataKeyWithoutPlaintext needs exactly one of KeySpec and
NumberOfBytes, which 30 random documents missed in about 5 % of runs).

Not fuzzed: CreateKey, which creates a real HSM key per successful call (unbounded token state);
its input validation is the same model-driven code every other operation goes through here.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.model import Shape
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hsmbridge.protocol.operations import build_operations
from hsmbridge.protocol.validation import kms_model
from tests.callers import ADMIN_ARN
from tests.e2e.e2e_support import send_raw
from tests.e2e.test_e2e_contract import COMMON_ERRORS, DIVERGENCES
from tests.output_shapes import output_validate

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

MAX_EXAMPLES = 30
SKIPPED = {"CreateKey": "creates a real HSM key per success; see the module docstring"}
# Strings longer than this are generated only as one over-the-limit value, to keep bodies small.
LONG = 64

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)


def _string(shape: Shape, wild: bool) -> st.SearchStrategy[Any]:
    low = shape.metadata.get("min", 0)
    high = shape.metadata.get("max")
    pattern = shape.metadata.get("pattern")
    if shape.enum:
        valid = st.sampled_from(shape.enum)
    elif pattern:
        cap = min(high or LONG, LONG)
        valid = st.from_regex(pattern, fullmatch=True).filter(lambda v: low <= len(v) <= cap)
    else:
        valid = st.text(min_size=low, max_size=min(high or LONG, LONG))
    if not wild:
        return valid
    options = [valid, st.text(max_size=LONG)]
    if high is not None:
        options.append(st.just("x" * (high + 1)))
    if low > 0:
        options.append(st.just("x" * (low - 1)))
    return st.one_of(options)


def _integer(shape: Shape, wild: bool) -> st.SearchStrategy[Any]:
    low = shape.metadata.get("min", 0)
    high = shape.metadata.get("max", 2**31 - 1)
    valid = st.integers(low, min(high, low + 1100))
    if not wild:
        return valid
    return valid | st.integers(low - 2, low) | st.integers(high, high + 2) | st.integers()


def _blob(shape: Shape, wild: bool) -> st.SearchStrategy[Any]:
    low = shape.metadata.get("min", 0)
    high = shape.metadata.get("max", LONG)
    valid = st.binary(min_size=low, max_size=min(high, 300))
    if wild:
        valid = valid | st.binary(max_size=2) | st.just(b"x" * (high + 1))
    encoded = valid.map(lambda b: base64.b64encode(b).decode())
    return encoded | st.just("%%not base64") if wild else encoded


def _leaf(shape: Shape, known: dict[str, list[Any]], wild: bool) -> st.SearchStrategy[Any]:
    kind = shape.type_name
    if kind == "structure":
        return _structure(shape, known, wild)
    if kind == "list":
        return st.lists(_member(shape.member, {}, "", wild), max_size=4)
    if kind == "map":
        key = _leaf(shape.key, {}, wild)
        return st.dictionaries(key, _member(shape.value, {}, "", wild), max_size=4)
    return _SCALARS[kind](shape, wild)


_SCALARS = {
    "string": _string,
    "integer": _integer,
    "long": _integer,
    "blob": _blob,
    "boolean": lambda _, wild: st.booleans(),
    "timestamp": lambda _, wild: st.integers(0, 2**32),
}


def _member(
    shape: Shape, known: dict[str, list[Any]], name: str, wild: bool
) -> st.SearchStrategy[Any]:
    right = _leaf(shape, known, wild)
    if known.get(name):
        # Known-good values (the fuzz key, a valid blob, ...) get requests past validation.
        right = st.sampled_from(known[name]) | right
    if not wild:
        return right
    # Mostly well-typed values, sometimes any other JSON value (a wrong type or null).
    # (hypothesis starts from, and shrinks towards, small integers: 0 must be the valid side.)
    return st.integers(0, 9).flatmap(lambda n: JSON_VALUES if n == 9 else right)


def _structure(shape: Shape, known: dict[str, list[Any]], wild: bool) -> st.SearchStrategy[Any]:
    required = list(shape.required_members)
    members = {m: _member(s, known, m, wild) for m, s in shape.members.items()}
    # Well-formed documents always carry the members we know good values for: some operations
    # need members the model marks optional (GenerateRandom's NumberOfBytes, the cluster id of
    # CreateCustomKeyStore), and leaving them out would stop most requests at the edge.
    always = set(required) | (set() if wild else set(known) & set(members))
    present = st.fixed_dictionaries(
        {m: members[m] for m in members if m in always},
        optional={m: s for m, s in members.items() if m not in always},
    )
    if not wild or not required:
        return present
    # One wild document in five loses some of its required members.
    dropped = st.integers(0, 4).flatmap(
        lambda n: st.sets(st.sampled_from(required)) if n == 4 else st.just(set())
    )
    return st.tuples(present, dropped).map(
        lambda t: {k: v for k, v in t[0].items() if k not in t[1]}
    )


def request_strategy(operation: str, known: dict[str, list[Any]]) -> st.SearchStrategy[Any]:
    """Half well-formed documents (which reach the service), half wild ones (which test the
    edge), and rarely a body that is not a JSON object at all."""
    shape = kms_model().operation_model(operation).input_shape
    if shape is None:
        return st.just({})
    valid, wild = _structure(shape, known, False), _structure(shape, known, True)
    return st.integers(0, 19).flatmap(
        lambda n: valid if n < 10 else wild if n < 19 else JSON_VALUES
    )


@pytest.fixture(scope="module")
def known(shared) -> dict[str, list[Any]]:
    """Valid values to mix in, all on keys of the fuzz run's own (so other tests' keys and the
    shared store's name and connection are never touched)."""
    kms = shared.kms
    key = shared.create_key("fuzz")
    other = shared.create_key("fuzz-other")
    run = uuid.uuid4().hex[:8]
    alias = f"alias/fuzz-{run}"
    kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"fuzz", EncryptionContext={"k": "v"})
    policy = kms.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
    principal = ADMIN_ARN  # the credentials file's principal
    grant = kms.create_grant(KeyId=key["KeyId"], GranteePrincipal=principal, Operations=["Encrypt"])
    key_refs = [key["KeyId"], key["Arn"], alias, other["KeyId"]]
    return {
        "KeyId": key_refs,
        "TargetKeyId": key_refs,
        "DestinationKeyId": key_refs,
        "SourceKeyId": key_refs,
        "CiphertextBlob": [base64.b64encode(blob["CiphertextBlob"]).decode()],
        "EncryptionContext": [{"k": "v"}],
        "SourceEncryptionContext": [{"k": "v"}],
        # Bounded (50 aliases per key) and unique to this run: the server is session-wide.
        "AliasName": [f"alias/fuzz-{run}-{i}" for i in range(4)],
        "Policy": [policy],
        "PolicyName": ["default"],
        # The shared store's cluster: CreateCustomKeyStore gets past validation and stops at
        # CloudHsmClusterInUseException, so no store is ever created by the fuzzer.
        "CloudHsmClusterId": [shared.env.cluster_id],
        "TrustAnchorCertificate": [shared.env.pki.ca_cert_pem],
        "KeyStorePassword": ["kmsuser-password"],
        "GranteePrincipal": [principal],
        "RetiringPrincipal": [principal],
        "Operations": [["Encrypt", "Decrypt"]],
        "GrantId": [grant["GrantId"]],
        "GrantToken": [grant["GrantToken"]],
    }


# Operations for which the shared store's id is safe to inject (they neither rename, disconnect
# nor delete it; ConnectCustomKeyStore of a CONNECTED store is a no-op).
STORE_ID_SAFE = {"GenerateRandom", "DescribeCustomKeyStores", "ConnectCustomKeyStore"}


def _allowed(operation: str) -> set[str]:
    listed = {s.name for s in kms_model().operation_model(operation).error_shapes}
    extra = {code for op, code in DIVERGENCES if op == operation}
    return (listed | COMMON_ERRORS | extra) - {"KMSInternalException"}


FUZZED = sorted(
    {
        "CreateCustomKeyStore", "DescribeCustomKeyStores", "ConnectCustomKeyStore",
        "DisconnectCustomKeyStore", "UpdateCustomKeyStore", "DeleteCustomKeyStore",
        "DescribeKey", "ListKeys", "EnableKey", "DisableKey", "ScheduleKeyDeletion",
        "CancelKeyDeletion", "UpdateKeyDescription", "GetKeyRotationStatus",
        "EnableKeyRotation", "DisableKeyRotation", "CreateAlias", "UpdateAlias",
        "DeleteAlias", "ListAliases", "TagResource", "UntagResource", "ListResourceTags",
        "GetKeyPolicy", "PutKeyPolicy", "ListKeyPolicies", "Encrypt", "Decrypt", "ReEncrypt",
        "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateRandom",
        "CreateGrant", "ListGrants", "ListRetirableGrants", "RetireGrant", "RevokeGrant",
        "Sign", "Verify", "GenerateMac", "VerifyMac",
    }
)  # fmt: skip


def test_every_implemented_operation_is_fuzzed_or_skipped_with_a_reason(shared):
    # The parameter list is static (collection happens before any server exists); this keeps it
    # in step with the operation table.
    implemented = set(build_operations(shared.runtime.service))
    assert set(FUZZED) | set(SKIPPED) == implemented
    assert not set(FUZZED) & set(SKIPPED)


# Answers that mean a request stopped at the edge's shape checks.
SHAPE_ERRORS = frozenset({"ValidationException", "SerializationException"})
# Well-formed ids that name nothing: the known-good request of an operation that would disconnect,
# rename or delete the shared store, or schedule the fuzz key's deletion, gets NotFound from the
# service instead (still past the edge).
UNKNOWN_STORE = "cks-0123456789abcdef0"
UNKNOWN_KEY = "00000000-0000-4000-8000-000000000000"

_Known = dict[str, list[Any]]


def _key(v: _Known) -> dict[str, Any]:
    return {"KeyId": v["KeyId"][0]}


def _b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


# One request per fuzzed operation that passes every shape check (and the service's own
# cross-member rules, such as exactly one of KeySpec / NumberOfBytes), built from `known`.
GOOD: dict[str, Callable[[_Known], dict[str, Any]]] = {
    "CreateCustomKeyStore": lambda v: {
        "CustomKeyStoreName": "fuzz-known-good",
        "CloudHsmClusterId": v["CloudHsmClusterId"][0],
        "TrustAnchorCertificate": v["TrustAnchorCertificate"][0],
        "KeyStorePassword": v["KeyStorePassword"][0],
    },  # the shared store's cluster: CloudHsmClusterInUseException, nothing is created
    "DescribeCustomKeyStores": lambda v: {"CustomKeyStoreId": v["CustomKeyStoreId"][0]},
    "ConnectCustomKeyStore": lambda v: {"CustomKeyStoreId": v["CustomKeyStoreId"][0]},
    "DisconnectCustomKeyStore": lambda v: {"CustomKeyStoreId": UNKNOWN_STORE},
    "UpdateCustomKeyStore": lambda v: {
        "CustomKeyStoreId": UNKNOWN_STORE,
        "NewCustomKeyStoreName": "fuzz-renamed",
    },
    "DeleteCustomKeyStore": lambda v: {"CustomKeyStoreId": UNKNOWN_STORE},
    "DescribeKey": _key,
    "ListKeys": lambda v: {"Limit": 10},
    "EnableKey": _key,
    "DisableKey": _key,
    "ScheduleKeyDeletion": lambda v: {"KeyId": UNKNOWN_KEY, "PendingWindowInDays": 7},
    "CancelKeyDeletion": _key,
    "UpdateKeyDescription": lambda v: {**_key(v), "Description": "fuzz"},
    "GetKeyRotationStatus": _key,
    "EnableKeyRotation": _key,
    "DisableKeyRotation": _key,
    "CreateAlias": lambda v: {"AliasName": v["AliasName"][0], "TargetKeyId": v["KeyId"][0]},
    "UpdateAlias": lambda v: {"AliasName": v["AliasName"][0], "TargetKeyId": v["KeyId"][3]},
    "DeleteAlias": lambda v: {"AliasName": v["AliasName"][1]},
    "ListAliases": lambda v: {"Limit": 10},
    "TagResource": lambda v: {**_key(v), "Tags": [{"TagKey": "fuzz", "TagValue": "1"}]},
    "UntagResource": lambda v: {**_key(v), "TagKeys": ["fuzz"]},
    "ListResourceTags": _key,
    "GetKeyPolicy": lambda v: {**_key(v), "PolicyName": "default"},
    "PutKeyPolicy": lambda v: {**_key(v), "PolicyName": "default", "Policy": v["Policy"][0]},
    "ListKeyPolicies": _key,
    "Encrypt": lambda v: {**_key(v), "Plaintext": _b64(b"fuzz"), "EncryptionContext": {"k": "v"}},
    "Decrypt": lambda v: {
        "CiphertextBlob": v["CiphertextBlob"][0],
        "EncryptionContext": v["EncryptionContext"][0],
    },
    "ReEncrypt": lambda v: {
        "CiphertextBlob": v["CiphertextBlob"][0],
        "SourceEncryptionContext": v["SourceEncryptionContext"][0],
        "DestinationKeyId": v["KeyId"][3],
    },
    "GenerateDataKey": lambda v: {**_key(v), "KeySpec": "AES_256"},
    "GenerateDataKeyWithoutPlaintext": lambda v: {**_key(v), "NumberOfBytes": 32},
    "GenerateRandom": lambda v: {"NumberOfBytes": 16},
    "CreateGrant": lambda v: {
        **_key(v),
        "GranteePrincipal": v["GranteePrincipal"][0],
        "Operations": v["Operations"][0],
    },
    "ListGrants": _key,
    "ListRetirableGrants": lambda v: {"RetiringPrincipal": v["RetiringPrincipal"][0]},
    "RetireGrant": lambda v: {"GrantToken": v["GrantToken"][0]},
    "RevokeGrant": lambda v: {**_key(v), "GrantId": "0" * 64},  # names no grant: NotFound
    # Past the edge to InvalidKeyUsageException: every key here is a symmetric encryption key.
    "Sign": lambda v: {**_key(v), "Message": _b64(b"fuzz"), "SigningAlgorithm": "ECDSA_SHA_256"},
    "Verify": lambda v: {
        **_key(v),
        "Message": _b64(b"fuzz"),
        "Signature": _b64(b"signature"),
        "SigningAlgorithm": "ECDSA_SHA_256",
    },
    "GenerateMac": lambda v: {**_key(v), "Message": _b64(b"fuzz"), "MacAlgorithm": "HMAC_SHA_256"},
    "VerifyMac": lambda v: {
        **_key(v),
        "Message": _b64(b"fuzz"),
        "Mac": _b64(b"mac"),
        "MacAlgorithm": "HMAC_SHA_256",
    },
}


def test_every_fuzzed_operation_has_a_known_good_request():
    assert set(GOOD) == set(FUZZED)


@pytest.mark.parametrize("operation", FUZZED)
def test_generated_requests_get_modelled_answers(operation, shared, known, observations):
    values = dict(known)
    if operation in STORE_ID_SAFE:
        values["CustomKeyStoreId"] = [shared.store_id]
    allowed = _allowed(operation)
    good = GOOD[operation](values)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis directory in the repository
        print_blob=True,  # a failing generated request is reported with its reproduction blob
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request_strategy(operation, values))
    # Runs first, every time: the known-good values must get requests past shape validation
    # into the service, or this test would only ever exercise the edge.
    @example(good)
    def check(params: Any) -> None:
        answer = send_raw(shared.url, operation, json.dumps(params).encode())
        text = answer.body.decode("utf-8", "replace")
        assert "Traceback" not in text
        body = answer.json
        code = "200" if answer.status == 200 else body["__type"]
        if params == good:
            assert code not in SHAPE_ERRORS, ("known-good request stopped at the edge", body)
        if answer.status == 200:
            assert output_validate(operation, body) == [], (params, body)
            return
        with observations.lock:
            observations.raw_errors.add((operation, code, answer.status))
        assert code in allowed, (params, answer.status, body)
        assert answer.status < 500, (params, answer.status, body)

    check()
