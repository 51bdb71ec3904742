"""The CloudHSM stand-in (softhsm/cloudhsm-shim/) for tests: built once, configured per run.

`HSMBRIDGE_TEST_HSM=cloudhsm-shim` makes every test token of the run a cluster reached through the
stand-in with the `cloudhsm` profile (tests/conftest.py `softhsm_env`); tests of the stand-in
itself use `shim_conf` to write settings of their own. The stand-in reads its settings file when
it initialises, so a process keeps the settings it started with: in-process tests share the
run's file, subprocesses may be given another one through `HSMBRIDGE_SHIM_CONF`.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Final

import pytest

from hsmbridge.config import HsmProfile, builtin_profile, load_profile

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "softhsm" / "cloudhsm-shim" / "build.sh"
STAND_IN_CLI = REPO / "softhsm" / "cloudhsm-shim" / "cloudhsm-cli"
TEST_HSM_ENV: Final = "HSMBRIDGE_TEST_HSM"
HSMS: Final = ("softhsm2", "cloudhsm-shim")
# cloudhsm-cli's arguments as the cloudhsm profile gives them, on the stand-in; the tests' clusters
# are named by their token's label there (in `hsmbridge init`'s, the label is the cluster id).
_ARGS = "--cluster-id {token_label} user change-password --username {user} --role crypto-user"
ROTATE_COMMAND: Final = (str(STAND_IN_CLI), *_ARGS.split())


def run_hsm() -> str:
    """Which HSM this run's tokens are reached through."""
    hsm = os.environ.get(TEST_HSM_ENV, "softhsm2")
    if hsm not in HSMS:
        raise ValueError(f"{TEST_HSM_ENV} must be one of {', '.join(HSMS)}, got {hsm!r}")
    return hsm


def build_shim() -> Path:
    """The stand-in's library, built from source if it is not built yet."""
    done = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


def shim_profile() -> HsmProfile:
    """The `cloudhsm` profile as `hsmbridge init --hsm cloudhsm-shim` binds it: the stand-in's
    module, and its cloudhsm-cli for the password rotation at connect."""
    return replace(
        load_profile(builtin_profile("cloudhsm")),
        module_path=str(build_shim()),
        password_change_command=ROTATE_COMMAND,
    )


def shim_conf(
    directory: Path,
    *,
    token_label: str | None = None,
    lockout_threshold: int = 5,
    faults: str = "",
) -> Path:
    """Write a settings file for the stand-in in `directory`: state in directory/state, faults
    read from directory/faults (written now with `faults`). No token label: every slot shows."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "faults").write_text(faults)
    conf = directory / "cloudhsm-shim.conf"
    conf.write_text(
        "state_dir = state\n"
        "faults = faults\n"
        f"lockout_threshold = {lockout_threshold}\n"
        + (f"token_label = {token_label}\n" if token_label else "")
    )
    return conf


def stand_in_cli(
    cluster: str, *args: str, role: str, pin: str, env: dict[str, str] | None = None
) -> dict[str, object]:
    """The stand-in's cloudhsm-cli on `cluster` (a token label), logged in as `role` with
    `pin` ("name:password"); its JSON answer. `env`: the environment (default this process's)."""
    argv = [str(STAND_IN_CLI), "--cluster-id", cluster, *args]
    extra = {"CLOUDHSM_ROLE": role, "CLOUDHSM_PIN": pin}
    done = subprocess.run(
        argv,
        env={**(os.environ if env is None else env), **extra},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def _set_kmsuser(
    cluster: str, role: str, pin: str, password: str, env: dict[str, str] | None = None
) -> None:
    change = ("user", "change-password", "--username", "kmsuser", "--role", "crypto-user")
    answer = stand_in_cli(cluster, *change, "--password", password, role=role, pin=pin, env=env)
    assert answer["error_code"] == 0, answer


def officer_resets_kmsuser(
    cluster: str, so_pin: str, password: str, env: dict[str, str] | None = None
) -> None:
    """An officer (admin: the token's SO PIN) sets kmsuser's password with the stand-in's CLI."""
    _set_kmsuser(cluster, "admin", f"admin:{so_pin}", password, env)


def user_changes_password(token_label: str, old: str, new: str) -> None:
    """kmsuser changes its own password with the stand-in's cloudhsm-cli (its first change
    records SoftHSM2's PIN as the cluster's token PIN, which then never changes)."""
    _set_kmsuser(token_label, "crypto-user", f"kmsuser:{old}", new)


def officer_sets_password(token_label: str, so_pin: str, password: str) -> None:
    """An officer sets kmsuser's password in the cluster behind `token_label`, the way the run's
    HSM has it done: the stand-in's cloudhsm-cli as admin, or SoftHSM2's C_InitPIN as its
    security officer (pkcs11-tool, in its own process: this process's SoftHSM2 would keep the
    old PIN)."""
    if run_hsm() == "cloudhsm-shim":
        officer_resets_kmsuser(token_label, so_pin, password)
        return
    argv = ["pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so"]
    argv += ["--token-label", token_label, "--login", "--login-type", "so", "--so-pin", so_pin]
    subprocess.run(
        [*argv, "--init-pin", "--new-pin", password], capture_output=True, check=True, timeout=60
    )


RUNBOOK_PASSWORD: Final = "RunbookKnown2026"


def runbook_password(token_label: str, so_pin: str, started_with: str) -> str:
    """The password an operator gives UpdateCustomKeyStore after the runbook's officer step.

    Where connect rotates kmsuser's password (the cloudhsm profile, on the stand-in), the one a
    test started with was spent by its first connect: an officer sets a known one. Where it does
    not (SoftHSM2), the password the test started with still holds."""
    if run_hsm() == "softhsm2":
        return started_with
    officer_sets_password(token_label, so_pin, RUNBOOK_PASSWORD)
    return RUNBOOK_PASSWORD


# For tests of what only the softhsm2 profile does (inline calls, its stale cross-process view,
# the caller's IV): skipped when every cluster of the run is behind the stand-in.
softhsm2_only = pytest.mark.skipif(
    run_hsm() != "softhsm2",
    reason="what the softhsm2 profile does; this run's clusters are CloudHSM (the stand-in)",
)
