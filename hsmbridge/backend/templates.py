"""The KMS key template and its post-create invariants, as plain data.

Owns: `key_template()` (the attributes every new key is generated with, by PKCS#11 attribute name)
and `REQUIRED` / `violations()` (what a key must read back as). Pure: attribute names and values
are strings, ints and bools, so the audit tool can reuse `violations()` without a PKCS#11 library.
`hsmbridge.backend.pkcs11` turns names into `pkcs11.Attribute` members.

Must not import: `pkcs11`, or anything in hsmbridge but `hsmbridge.backend.interface`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from hsmbridge.backend.interface import HsmKeyInfo

KEY_BYTES = 32  # AES-256, what KMS SYMMETRIC_DEFAULT keys are

# Names are `pkcs11.Attribute` member names; CLASS and KEY_TYPE values are `pkcs11.ObjectClass`
# and `pkcs11.KeyType` member names. Every usage flag is stated: SoftHSM turns omitted SIGN/VERIFY
# on for AES.
BASE_TEMPLATE: Mapping[str, object] = MappingProxyType(
    {
        "CLASS": "SECRET_KEY",
        "KEY_TYPE": "AES",
        "VALUE_LEN": KEY_BYTES,
        "TOKEN": True,
        "PRIVATE": True,
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "ENCRYPT": True,
        "DECRYPT": True,
        "WRAP": False,
        "UNWRAP": False,
        "SIGN": False,
        "VERIFY": False,
        "DERIVE": False,
    }
)

# LABEL and ID can never be omitted: the label is how hsmbridge finds the key, and CloudHSM is
# reported to reject the empty CKA_ID python-pkcs11 would otherwise send (§2.3).
_NOT_OMITTABLE = frozenset({"CLASS", "KEY_TYPE", "LABEL", "ID", "TOKEN", "EXTRACTABLE"})


def key_template(label: str, key_id: bytes, omit: Iterable[str] = ()) -> dict[str, object]:
    """The generation template for one KMS key, minus attributes the vendor rejects.

    Raises ValueError if `omit` names an attribute whose absence would change what the key is.
    """
    omitted = set(omit)
    forbidden = omitted & _NOT_OMITTABLE
    if forbidden:
        raise ValueError(f"template_omit may not drop {', '.join(sorted(forbidden))}")
    template = {k: v for k, v in BASE_TEMPLATE.items() if k not in omitted}
    template["LABEL"] = label
    template["ID"] = key_id
    return template


# What every KMS key must read back as: HsmKeyInfo field -> required value. Omitting an attribute
# from the template does not relax this: the token's default must still come out right.
REQUIRED: Mapping[str, object] = MappingProxyType(
    {
        "key_type": "AES",
        "value_len": KEY_BYTES,
        "token": True,
        "private": True,
        "sensitive": True,
        "extractable": False,
        "always_sensitive": True,
        "never_extractable": True,
        "local": True,
        "encrypt": True,
        "decrypt": True,
        "wrap": False,
        "unwrap": False,
        "sign": False,
        "verify": False,
        "derive": False,
    }
)

# Attribute names (pkcs11.Attribute members) to read back, in HsmKeyInfo field order.
READ_BACK: Mapping[str, str] = MappingProxyType(
    {
        "label": "LABEL",
        "key_id": "ID",
        "key_type": "KEY_TYPE",
        "value_len": "VALUE_LEN",
        "token": "TOKEN",
        "private": "PRIVATE",
        "sensitive": "SENSITIVE",
        "extractable": "EXTRACTABLE",
        "always_sensitive": "ALWAYS_SENSITIVE",
        "never_extractable": "NEVER_EXTRACTABLE",
        "local": "LOCAL",
        "encrypt": "ENCRYPT",
        "decrypt": "DECRYPT",
        "wrap": "WRAP",
        "unwrap": "UNWRAP",
        "sign": "SIGN",
        "verify": "VERIFY",
        "derive": "DERIVE",
    }
)


def violations(info: HsmKeyInfo) -> list[str]:
    """Every way `info` differs from REQUIRED, as human-readable lines; empty means compliant.

    An attribute the token would not reveal (None) is a violation: an unverifiable key is not
    a compliant one.
    """
    problems = []
    for field, wanted in REQUIRED.items():
        actual = getattr(info, field)
        if actual is None:
            problems.append(f"{READ_BACK[field]} is unreadable (want {wanted!r})")
        elif actual != wanted:
            problems.append(f"{READ_BACK[field]} is {actual!r} (want {wanted!r})")
    return problems
