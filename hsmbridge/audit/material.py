"""HSM key objects as an auditor sees them: finding a KMS key's material and printing it.

Owns: `find_material()` (the HSM key(s) labelled with one KMS key ARN, like
`cloudhsm-cli key list --filter attr.label=<ARN> --verbose`) and `material_dict()`, the printable
form of an `HsmKeyInfo` with its invariant violations. Must not import service, protocol, http
or cli.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hsmbridge.backend.interface import HsmBackend, HsmKeyInfo
from hsmbridge.backend.templates import violations


def key_id_text(raw: bytes) -> str:
    """CKA_ID as text when it is printable ASCII (hsmbridge writes the key id), else hex."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return raw.hex()
    return text if text.isprintable() else raw.hex()


def find_material(hsm: HsmBackend, arn: str) -> list[HsmKeyInfo]:
    """Every secret key labelled exactly `arn` (normally one), via one label search."""
    return sorted(hsm.find_keys(arn), key=lambda info: info.handle)


def material_dict(info: HsmKeyInfo) -> dict[str, Any]:
    """Handle, label, id and every attribute read, plus what violates the key template."""
    out: dict[str, Any] = {}
    for f in fields(info):
        value = getattr(info, f.name)
        out[f.name] = key_id_text(value) if isinstance(value, bytes) else value
    out["violations"] = violations(info)
    return out
