"""OpenSC's `pkcs11-tool` as an independent witness of what is on a SoftHSM2 token.

Tests use it to check hsmbridge's view of the token from outside our PKCS#11 code path: another
program, in another process, with its own PKCS#11 session and its own attribute reader.

It lists objects as a list, one entry per object (`secret_key_objects`, `secret_key_labels`), so
two objects with one label are two entries: a duplicate is visible, never folded into one. The
by-label view (`secret_keys`) refuses a token where labels repeat instead of hiding it.

`softhsm_conf` selects another SoftHSM2 configuration (an environment made by `hsmbridge init`,
whose tokens the pytest process never loads); without it the process's SOFTHSM2_CONF applies.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LIST_ATTEMPTS = 5  # a listing is retried this often (see `secret_key_objects`)
_HEADER = "Secret Key Object"
_LABEL = "  label:      "  # OpenSC prints the label verbatim after this prefix (0.23)


@dataclass(frozen=True)
class SecretKeyObject:
    """One secret key object as pkcs11-tool prints it."""

    header: str  # e.g. "Secret Key Object; AES length 32"
    label: str | None  # None when pkcs11-tool printed no label line
    id: str  # CKA_ID in hex, "" when the object has none
    usage: frozenset[str]
    access: frozenset[str]


def run(token_label: str, pin: str, *args: str, softhsm_conf: Path | None = None) -> str:
    """Run pkcs11-tool logged in to the token; returns stdout (raises on failure)."""
    env = None if softhsm_conf is None else {**os.environ, "SOFTHSM2_CONF": str(softhsm_conf)}
    cmd = ["pkcs11-tool", "--module", MODULE, "--token-label", token_label, "--login"]
    done = subprocess.run(
        [*cmd, "--pin", pin, *args], capture_output=True, text=True, check=True, timeout=60, env=env
    )
    return done.stdout


def parse_secret_keys(out: str) -> list[SecretKeyObject]:
    """`pkcs11-tool --list-objects --type secrkey` output, one entry per object, in its order."""
    blocks: list[list[str]] = []
    for line in out.splitlines():
        if line.startswith(_HEADER):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
        elif line.strip():
            raise AssertionError(f"pkcs11-tool printed {line!r} before any object")
    objects = []
    for header, *body in blocks:
        labels = [line[len(_LABEL) :] for line in body if line.startswith(_LABEL)]
        assert len(labels) <= 1, f"two label lines in one object: {body}"
        fields = {}
        for line in body:
            name, sep, value = line.strip().partition(":")
            if sep:
                fields[name] = value.strip()
        objects.append(
            SecretKeyObject(
                header=header,
                label=labels[0] if labels else None,
                id=fields.get("ID", ""),
                usage=_words(fields.get("Usage", "")),
                access=_words(fields.get("Access", "")),
            )
        )
    return objects


def _words(value: str) -> frozenset[str]:
    return frozenset(w.strip() for w in value.split(",") if w.strip())


def secret_key_objects(
    token_label: str, pin: str, *, softhsm_conf: Path | None = None
) -> list[SecretKeyObject]:
    """Every secret key object on the token, as a list: duplicates stay separate entries.

    A read, so a failed one is tried again: while servers on the same token log in or
    re-initialise, SoftHSM2 misreads the token's own file for a moment (CKR_GENERAL_ERROR,
    a torn label), and pkcs11-tool, the independent witness, has no retry of its own. Seen once
    beside two CPU burners in the SIGKILL instances test."""
    for attempt in range(LIST_ATTEMPTS):
        try:
            out = run(
                token_label, pin, "--list-objects", "--type", "secrkey", softhsm_conf=softhsm_conf
            )
        except subprocess.CalledProcessError:
            if attempt == LIST_ATTEMPTS - 1:
                raise
            time.sleep(0.2)
            continue
        return parse_secret_keys(out)
    raise AssertionError("unreachable: the last attempt returns or raises")


def secret_key_labels(
    token_label: str, pin: str, *, softhsm_conf: Path | None = None
) -> Counter[str]:
    """How many secret key objects carry each label ("" for an object without one)."""
    objects = secret_key_objects(token_label, pin, softhsm_conf=softhsm_conf)
    return Counter(o.label or "" for o in objects)


def secret_keys(token_label: str, pin: str) -> dict[str, dict[str, object]]:
    """The token's secret keys by label: {label: {header, id, usage, access}}.

    A label carried by several objects fails the calling test rather than keeping one of them.
    """
    objects = secret_key_objects(token_label, pin)
    labels = Counter(o.label for o in objects)
    repeated = {label: n for label, n in labels.items() if n > 1}
    assert not repeated, f"duplicate labels on token {token_label}: {repeated}"
    return {
        o.label: {"header": o.header, "id": o.id, "usage": set(o.usage), "access": set(o.access)}
        for o in objects
        if o.label is not None
    }
