"""Changing the crypto user's password on the HSM: KMS's rotation at every connect.

Owns: `change_password(binding, old, new)`, done the way the cluster's profile says
(`password_rotation`).
With "command" it runs the vendor's user-management CLI (CloudHSM: `cloudhsm-cli user
change-password`, single-command mode): the tool logs in as the crypto user with the old password
from its environment (CLOUDHSM_ROLE, CLOUDHSM_PIN) and reads the new one, twice, from standard
input, so neither password is on a command line. Its JSON answer ({"error_code": 0|1, "data": ...})
becomes a `LoginError` with the ConnectionErrorCode KMS would report, or another BackendError.

The texts matched in a failure are the CloudHSM stand-in's (softhsm/cloudhsm-shim/cloudhsm_cli.py)
and the words CloudHSM's documentation uses; [unverified] against the real tool's messages, which
staging checks (`hsmbridge doctor`). An unrecognised failure is an HsmInternalError.
WARNING: passwords never reach a message: the tool's own text is scrubbed of both.
Must not import anything in hsmbridge but `hsmbridge.backend.errors`, `hsmbridge.config` and
`hsmbridge.model`.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Final

from hsmbridge.backend.errors import (
    BackendError,
    HsmInternalError,
    HsmUnreachableError,
    LoginError,
    MisconfiguredError,
)
from hsmbridge.config import ClusterBinding, PasswordRotation
from hsmbridge.model import ConnectionErrorCode

COMMAND_TIMEOUT_S: Final = 60.0
_REASONS: Final = (
    # (words in the tool's message, lower case) -> what KMS reports; the first match wins.
    (("locked",), ConnectionErrorCode.USER_LOCKED_OUT),
    (("logged in", "logged-in"), ConnectionErrorCode.USER_LOGGED_IN),
    (("not found", "does not exist", "no such user"), ConnectionErrorCode.USER_NOT_FOUND),
    (
        ("incorrect password", "invalid credentials", "login failed", "authentication failed"),
        ConnectionErrorCode.INVALID_CREDENTIALS,
    ),
)


def change_password(
    binding: ClusterBinding, old: str, new: str, *, timeout_s: float = COMMAND_TIMEOUT_S
) -> None:
    """Set the crypto user's password from `old` to `new`; a no-op when the profile does not
    rotate. In the command, `{user}`, `{cluster_id}` and `{token_label}` stand for the crypto
    user, the cluster and the token label of the binding. Raises LoginError (with the KMS
    reason), MisconfiguredError (no such command), HsmUnreachableError (it did not answer in
    time) or HsmInternalError."""
    profile = binding.profile
    if profile.password_rotation is PasswordRotation.NONE:
        return
    user = profile.crypto_user
    fields = {"user": user, "cluster_id": binding.cluster_id, "token_label": profile.token_label}
    argv = [_fill(arg, fields) for arg in profile.password_change_command]
    env = {**os.environ, "CLOUDHSM_ROLE": "crypto-user", "CLOUDHSM_PIN": f"{user}:{old}"}
    try:
        done = subprocess.run(  # argv comes from the operator's configuration
            argv,
            input=f"{new}\n{new}\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        raise MisconfiguredError(
            f"the password change command {argv[0]} does not exist; install the HSM's client "
            "tools or set password_change_command"
        ) from None
    except subprocess.TimeoutExpired:
        raise HsmUnreachableError(
            f"the password change command {argv[0]} did not finish within {timeout_s:.0f} s"
        ) from None
    answer = _answer(done.stdout)
    if done.returncode == 0 and (answer is None or answer.get("error_code", 0) == 0):
        return
    said = answer.get("data") if answer else None
    text = str(said) if said is not None else (done.stderr or done.stdout).strip()
    raise _failure(_scrub(text, old, new)[-300:] or f"exit status {done.returncode}")


def _fill(arg: str, fields: dict[str, str | None]) -> str:
    for name, value in fields.items():
        if f"{{{name}}}" in arg:
            if value is None:
                raise MisconfiguredError(
                    f"password_change_command uses {{{name}}}, which this cluster does not set"
                )
            arg = arg.replace(f"{{{name}}}", value)
    return arg


def _answer(stdout: str) -> dict[str, object] | None:
    try:
        doc = json.loads(stdout)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return " ".join(text.split())


def _failure(message: str) -> BackendError:
    lowered = message.lower()
    for words, reason in _REASONS:
        if any(word in lowered for word in words):
            return LoginError(reason, f"changing the kmsuser password failed: {message}")
    return HsmInternalError(f"changing the kmsuser password failed: {message}")
