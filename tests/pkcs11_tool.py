"""OpenSC's `pkcs11-tool` as an independent witness of what is on a SoftHSM2 token.

Tests use it to check hsmbridge's view of the token from outside our PKCS#11 code path.
"""

from __future__ import annotations

import re
import subprocess

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def run(token_label: str, pin: str, *args: str) -> str:
    """Run pkcs11-tool logged in to the token; returns stdout (raises on failure)."""
    cmd = ["pkcs11-tool", "--module", MODULE, "--token-label", token_label, "--login"]
    done = subprocess.run(
        [*cmd, "--pin", pin, *args], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout


def secret_keys(token_label: str, pin: str) -> dict[str, dict[str, object]]:
    """`--list-objects --type secrkey`, parsed into {label: {header, id, usage, access}}."""
    out = run(token_label, pin, "--list-objects", "--type", "secrkey")
    keys: dict[str, dict[str, object]] = {}
    for block in re.split(r"^(?=Secret Key Object)", out, flags=re.MULTILINE):
        fields = dict(re.findall(r"^\s+(\w+):\s+(.*?)\s*$", block, flags=re.MULTILINE))
        if "label" in fields:
            keys[fields["label"]] = {
                "header": block.splitlines()[0],
                "id": fields.get("ID", ""),
                "usage": {u.strip() for u in fields.get("Usage", "").split(",") if u.strip()},
                "access": {a.strip() for a in fields.get("Access", "").split(",") if a.strip()},
            }
    return keys
