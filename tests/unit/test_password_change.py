"""The password change at connect through the vendor's CLI (`hsmbridge.backend.password_change`),
against a small real command standing in for it: what it is given, and how its answers map to
the ConnectionErrorCodes KMS reports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hsmbridge.backend import HsmInternalError, HsmUnreachableError, LoginError, MisconfiguredError
from hsmbridge.backend.password_change import change_password
from hsmbridge.config import ClusterBinding, PasswordRotation, builtin_profile, load_profile
from hsmbridge.model import ConnectionErrorCode as E

_TOOL = """#!/bin/sh
# Records what it was given, then answers what the test asked for.
read -r first
read -r second
printf '%s\\n' "$CLOUDHSM_ROLE" "$CLOUDHSM_PIN" "$first" "$second" "$*" > "$0.seen"
sleep "${SLEEP:-0}"
cat "$0.answer"
exit "$(cat "$0.status")"
"""


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    path = tmp_path / "cloudhsm-cli"
    path.write_text(_TOOL)
    path.chmod(0o755)
    return path


def _binding(tool: Path, *args: str, token_label: str | None = "token-1") -> ClusterBinding:  # noqa: S107
    profile = replace(
        load_profile(builtin_profile("cloudhsm")),
        password_change_command=(str(tool), *args),
        token_label=token_label,
    )
    return ClusterBinding("cluster-abcdefghijk", profile)


def _answers(tool: Path, doc: object, status: int = 0) -> None:
    Path(f"{tool}.answer").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    Path(f"{tool}.status").write_text(str(status))


def test_the_tool_gets_the_old_password_in_its_environment_and_the_new_one_on_stdin(tool):
    _answers(tool, {"error_code": 0, "data": {"username": "kmsuser"}})
    binding = _binding(tool, "--cluster-id", "{cluster_id}", "--username", "{user}")
    change_password(binding, "OldPassw0rd", "NewPassw0rd")
    role, pin, first, second, argv = Path(f"{tool}.seen").read_text().splitlines()
    assert (role, pin) == ("crypto-user", "kmsuser:OldPassw0rd")
    assert (first, second) == ("NewPassw0rd", "NewPassw0rd")  # the password and its confirmation
    assert argv == "--cluster-id cluster-abcdefghijk --username kmsuser"  # no secret on argv


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("user kmsuser is locked after 5 failed logins", E.USER_LOCKED_OUT),
        ("user kmsuser is logged in from another process (pid 42)", E.USER_LOGGED_IN),
        ("user kmsuser not found", E.USER_NOT_FOUND),
        ("incorrect password for user kmsuser (1 failed login(s))", E.INVALID_CREDENTIALS),
    ],
)
def test_failures_become_the_connection_error_codes_kms_reports(tool, message, reason):
    _answers(tool, {"error_code": 1, "data": message}, status=1)
    with pytest.raises(LoginError) as caught:
        change_password(_binding(tool), "OldPassw0rd", "NewPassw0rd")
    assert caught.value.reason is reason


def test_an_unrecognised_failure_is_internal_and_never_shows_a_password(tool):
    _answers(tool, "crashed while setting OldPassw0rd to NewPassw0rd\n", status=3)
    with pytest.raises(HsmInternalError) as caught:
        change_password(_binding(tool), "OldPassw0rd", "NewPassw0rd")
    assert "Passw0rd" not in str(caught.value)
    assert "crashed while setting *** to ***" in str(caught.value)


def test_a_missing_or_silent_tool_and_an_unset_placeholder(tool, tmp_path, monkeypatch):
    with pytest.raises(MisconfiguredError, match="does not exist"):
        change_password(_binding(tmp_path / "no-such-cli"), "OldPassw0rd", "NewPassw0rd")
    _answers(tool, {"error_code": 0})
    monkeypatch.setenv("SLEEP", "5")
    with pytest.raises(HsmUnreachableError, match="did not finish"):
        change_password(_binding(tool), "OldPassw0rd", "NewPassw0rd", timeout_s=0.5)
    monkeypatch.delenv("SLEEP")
    unlabelled = _binding(tool, "--cluster-id", "{token_label}", token_label=None)
    with pytest.raises(MisconfiguredError, match="token_label"):
        change_password(unlabelled, "OldPassw0rd", "NewPassw0rd")


def test_a_profile_that_does_not_rotate_changes_nothing(tmp_path):
    binding = _binding(tmp_path / "no-such-cli")
    still = replace(binding.profile, password_rotation=PasswordRotation.NONE)
    change_password(replace(binding, profile=still), "OldPassw0rd", "NewPassw0rd")
