"""The `cloudhsm-cli` stand-in (softhsm/cloudhsm-shim/cloudhsm-cli) against the CloudHSM shim.

Each test gets a private SoftHSM2 token directory (softhsm/init-token.sh) and shim state under
tmp_path. Everything PKCS#11 runs in subprocesses: the CLI itself, and small python-pkcs11
scripts that log in through the shim module, so the shared lockout counters and login markers
are exercised across processes as in production. The pytest process never loads a PKCS#11
module (its SOFTHSM2_CONF belongs to the session's token stock).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIM_DIR = REPO / "softhsm" / "cloudhsm-shim"
CLI = SHIM_DIR / "cloudhsm-cli"
LABEL = "cli-test-cluster"
SO_PIN = "so-secret-0001"
OLD = "user-secret-0001"
NEW = "user-secret-0002"
THRESHOLD = 5

# Logs in through the shim with each PIN in turn (closing the session after a success) and
# prints the outcomes as JSON: "ok" or the python-pkcs11 exception's name. With "hold" it stays
# logged in after the first success, having printed "ready", until its stdin closes.
LOGIN_SCRIPT = r"""
import json, sys
import pkcs11
from pkcs11.exceptions import PKCS11Error
module, label, mode, pins = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
token = pkcs11.lib(module).get_token(token_label=label)
outcomes = []
for pin in pins:
    try:
        session = token.open(user_pin=pin)
    except PKCS11Error as exc:
        outcomes.append(type(exc).__name__)
        continue
    outcomes.append("ok")
    if mode == "hold":
        print("ready", flush=True)
        sys.stdin.read()
    session.close()
print(json.dumps(outcomes), flush=True)
"""


@pytest.fixture(scope="module")
def shim_module() -> Path:
    done = subprocess.run(
        ["sh", str(SHIM_DIR / "build.sh")], capture_output=True, text=True, check=True, timeout=120
    )
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]
    shim: Path
    state: Path  # STATE_DIR/<token label>

    def cli(self, *args: str, role: str | None = None, pin: str | None = None) -> tuple[int, Any]:
        """Runs cloudhsm-cli; returns (exit status, the `data` of its JSON)."""
        env = dict(self.env)
        if role is not None:
            env["CLOUDHSM_ROLE"] = role
        if pin is not None:
            env["CLOUDHSM_PIN"] = pin
        done = subprocess.run(
            [str(CLI), *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert "Traceback" not in done.stderr, done.stderr
        for secret in (SO_PIN, OLD, NEW):
            assert secret not in done.stdout + done.stderr
        body = json.loads(done.stdout)
        assert set(body) == {"error_code", "data"}
        assert body["error_code"] == done.returncode, body
        assert done.returncode in (0, 1)
        if done.returncode:
            assert isinstance(body["data"], str)
            assert "\n" not in body["data"]
        return done.returncode, body["data"]

    def change(self, user: str, new: str, role: str, pin: str) -> tuple[int, Any]:
        args = ("user", "change-password", "--username", user, "--role", "crypto-user")
        return self.cli(*args, "--password", new, role=role, pin=pin)

    def users(self) -> dict[str, dict[str, str]]:
        status, data = self.cli("user", "list")
        assert status == 0, data
        return {entry["username"]: entry for entry in data["users"]}

    def _login_cmd(self, mode: str, pins: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-c", LOGIN_SCRIPT, str(self.shim), LABEL, mode, *pins]

    def shim_logins(self, *pins: str) -> list[str]:
        """Logs in through the shim with each PIN ("USER:password") in one new process."""
        done = subprocess.run(
            self._login_cmd("once", pins),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        outcomes: list[str] = json.loads(done.stdout)
        return outcomes

    @contextmanager
    def logged_in(self, pin: str) -> Iterator[subprocess.Popen[str]]:
        """A process logged in through the shim while the block runs (unless the block ends it)."""
        proc = subprocess.Popen(
            self._login_cmd("hold", (pin,)),
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)

    def failures_file(self, user: str) -> Path:
        return self.state / "failed-logins" / user


@pytest.fixture
def cluster(tmp_path: Path, shim_module: Path) -> Cluster:
    softhsm_conf = tmp_path / "softhsm2.conf"
    subprocess.run(
        ["sh", str(REPO / "softhsm" / "init-token.sh"), str(softhsm_conf), LABEL],
        env={**os.environ, "HSMBRIDGE_SO_PIN": SO_PIN, "HSMBRIDGE_USER_PIN": OLD},
        capture_output=True,
        check=True,
        timeout=60,
    )
    shim_conf = tmp_path / "shim.conf"
    shim_conf.write_text(
        f"token_label = {LABEL}\n"
        "state_dir = shim-state   # relative to this file\n"
        f"lockout_threshold = {THRESHOLD}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHSM_")}
    env.update(SOFTHSM2_CONF=str(softhsm_conf), HSMBRIDGE_SHIM_CONF=str(shim_conf))
    return Cluster(tmp_path, env, shim_module, tmp_path / "shim-state" / LABEL)


def _with_users(cluster: Cluster, *names: str) -> None:
    cluster.state.mkdir(parents=True, exist_ok=True)
    (cluster.state / "users").write_text("".join(f"{name}\n" for name in names))


def test_list_without_a_users_file_shows_the_admin_and_kmsuser(cluster: Cluster) -> None:
    status, data = cluster.cli("user", "list")
    assert status == 0
    assert data == {
        "users": [
            {"username": "admin", "role": "admin", "locked": "false"},
            {"username": "kmsuser", "role": "crypto-user", "locked": "false", "logged-in": "false"},
        ]
    }


def test_admin_password_reset_unlocks_a_user_locked_by_failed_shim_logins(
    cluster: Cluster,
) -> None:
    _with_users(cluster, "kmsuser", "alice")
    wrong = ["alice:not-the-password"] * THRESHOLD
    assert cluster.shim_logins(*wrong, f"alice:{OLD}") == ["PinIncorrect"] * 5 + ["PinLocked"]
    users = cluster.users()
    assert list(users) == ["admin", "kmsuser", "alice"]
    assert users["alice"]["locked"] == "true"
    assert users["kmsuser"]["locked"] == "false"

    status, data = cluster.change("alice", NEW, "admin", "admin:wrong-so-pin")
    assert (status, data) == (1, "admin login failed: incorrect password for admin")
    assert cluster.users()["alice"]["locked"] == "true"

    status, data = cluster.change("alice", NEW, "admin", f"admin:{SO_PIN}")
    assert (status, data) == (0, {"username": "alice", "role": "crypto-user"})
    assert cluster.users()["alice"]["locked"] == "false"
    assert not cluster.failures_file("alice").exists()
    # One SoftHSM2 user PIN behind every CU: the new password is everyone's.
    assert cluster.shim_logins(f"alice:{OLD}", f"alice:{NEW}", f"kmsuser:{NEW}") == [
        "PinIncorrect",
        "ok",
        "ok",
    ]


def test_a_user_changes_its_own_password(cluster: Cluster) -> None:
    status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
    assert (status, data) == (0, {"username": "kmsuser", "role": "crypto-user"})
    assert cluster.shim_logins(f"kmsuser:{OLD}", f"kmsuser:{NEW}") == ["PinIncorrect", "ok"]


def test_a_user_cannot_change_another_users_password(cluster: Cluster) -> None:
    _with_users(cluster, "kmsuser", "alice")
    status, data = cluster.change("kmsuser", NEW, "crypto-user", f"alice:{OLD}")
    assert status == 1
    assert "may change only its own password" in data
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["ok"]


def test_a_wrong_old_password_counts_toward_lockout_with_the_shims_failures(
    cluster: Cluster,
) -> None:
    bad = "kmsuser:wrong-old-1"
    status, data = cluster.change("kmsuser", NEW, "crypto-user", bad)
    assert (status, data) == (
        1,
        "incorrect password for user kmsuser (1 failed login, 4 left before lockout)",
    )
    assert cluster.failures_file("kmsuser").read_text().strip() == "1"
    # A success resets the count, as a successful shim login does.
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["ok"]
    assert not cluster.failures_file("kmsuser").exists()

    assert cluster.shim_logins(*[bad] * 3) == ["PinIncorrect"] * 3
    status, data = cluster.change("kmsuser", NEW, "crypto-user", bad)
    assert status == 1
    assert data.endswith("(4 failed logins, 1 left before lockout)")
    status, data = cluster.change("kmsuser", NEW, "crypto-user", bad)
    assert status == 1
    assert "kmsuser is now locked after 5 failed logins" in data
    assert cluster.failures_file("kmsuser").read_text().strip() == "5"

    # Locked: even the right password is refused without being tried, by both.
    status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
    assert status == 1
    assert data.startswith("user kmsuser is locked")
    assert cluster.failures_file("kmsuser").read_text().strip() == "5"
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["PinLocked"]
    assert cluster.users()["kmsuser"]["locked"] == "true"


def test_a_change_is_refused_while_another_process_is_logged_in_as_the_user(
    cluster: Cluster,
) -> None:
    refused = "user kmsuser is logged in from another process (pid {}); log it out first"
    with cluster.logged_in(f"kmsuser:{OLD}") as holder:
        assert cluster.users()["kmsuser"]["logged-in"] == "true"
        status, data = cluster.change("kmsuser", NEW, "admin", f"admin:{SO_PIN}")
        assert (status, data) == (1, refused.format(holder.pid))
        status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
        assert (status, data) == (1, refused.format(holder.pid))
        # Nothing changed: the old password still works, nothing was counted.
        assert cluster.shim_logins(f"kmsuser:{OLD}") == ["ok"]
        assert not cluster.failures_file("kmsuser").exists()
        # Logging out (the session closes, the process ends) removes its marker.
        holder.communicate(input="", timeout=30)
        assert holder.returncode == 0
    assert cluster.users()["kmsuser"]["logged-in"] == "false"

    with cluster.logged_in(f"kmsuser:{OLD}") as holder:
        marker = cluster.state / "logins" / f"kmsuser.{holder.pid}"
        assert marker.exists()
        holder.send_signal(signal.SIGKILL)  # no logout: its marker stays behind, stale
        holder.wait(timeout=30)
        assert marker.exists()
        status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
        assert (status, data) == (0, {"username": "kmsuser", "role": "crypto-user"})
        assert not marker.exists()
    assert cluster.shim_logins(f"kmsuser:{NEW}") == ["ok"]


def test_an_unknown_user_is_not_found(cluster: Cluster) -> None:
    _with_users(cluster, "alice")
    expected = (1, "user kmsuser not found")
    assert cluster.change("kmsuser", NEW, "admin", f"admin:{SO_PIN}") == expected
    assert cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}") == expected
    assert cluster.change("../alice", NEW, "admin", f"admin:{SO_PIN}") == (
        1,
        "user ../alice not found",
    )
    assert cluster.shim_logins(f"alice:{OLD}") == ["ok"]


@pytest.mark.parametrize("new", ["short-7", "x" * 33])
def test_a_new_password_must_be_8_to_32_characters(cluster: Cluster, new: str) -> None:
    for role, pin in (("admin", f"admin:{SO_PIN}"), ("crypto-user", f"kmsuser:{OLD}")):
        status, data = cluster.change("kmsuser", new, role, pin)
        assert status == 1
        assert data == f"the new password must be 8 to 32 characters long (it has {len(new)})"
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["ok"]


def test_usage_and_credential_errors_are_json_with_exit_status_1(cluster: Cluster) -> None:
    change = ("user", "change-password", "--username", "kmsuser", "--role", "crypto-user")
    admin_role = ("user", "change-password", "--username", "admin", "--role", "admin")
    as_admin_role = (*admin_role, "--password", NEW)
    cases: list[tuple[tuple[str, ...], str | None, str | None, str]] = [
        ((), None, None, "usage: cloudhsm-cli user list"),
        (("user",), None, None, "usage:"),
        (("user", "delete", "--username", "kmsuser"), None, None, "usage:"),
        (("user", "list", "--verbose"), None, None, "usage:"),
        ((*change, "--password", NEW), None, None, "no credentials"),
        ((*change, "--password", NEW), "officer", f"admin:{SO_PIN}", "must be admin or crypto"),
        ((*change, "--password", NEW), "admin", SO_PIN, "CLOUDHSM_PIN must be name:password"),
        ((*change, "--password", NEW), "admin", f"root:{SO_PIN}", "only admin is 'admin'"),
        (change, "admin", f"admin:{SO_PIN}", "missing --password"),
        ((*change, "--password", NEW, "--force"), "admin", f"admin:{SO_PIN}", "'--force'"),
        (as_admin_role, "admin", f"admin:{SO_PIN}", "only crypto-user passwords"),
    ]
    for args, role, pin, expected in cases:
        status, data = cluster.cli(*args, role=role, pin=pin)
        assert status == 1, (args, data)
        assert expected in data, (args, data)

    broken = cluster.env | {"HSMBRIDGE_SHIM_CONF": str(cluster.tmp / "missing.conf")}
    done = subprocess.run(
        [str(CLI), "user", "list"], env=broken, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["data"].startswith("cannot read the shim conf")
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["ok"]
