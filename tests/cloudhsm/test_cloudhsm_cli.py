"""The `cloudhsm-cli` stand-in (softhsm/cloudhsm-shim/cloudhsm-cli) against the CloudHSM shim.

Each test gets a private SoftHSM2 token directory (softhsm/init-token.sh) and shim state under
tmp_path. Everything PKCS#11 runs in subprocesses: the CLI itself, and small python-pkcs11
scripts that log in through the shim module, so the shared lockout counters and login markers
are exercised across processes as in production. "Resident" processes load the shim before a
password change and log in after it without re-initialising, as hsmbridge's server workers do:
the point of the shim's password records (a SoftHSM2 PIN change reaches only processes that
initialise afterwards). The pytest process never loads a PKCS#11 module (its SOFTHSM2_CONF
belongs to the session's token stock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
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
OLD = "user-secret-0001"  # SoftHSM2's user PIN of the fresh token: every CU's, passthrough
NEW = "user-secret-0002"
NEW2 = "user-secret-0003"
OTHER = "user-secret-0004"
PASSWORDS = (SO_PIN, OLD, NEW, NEW2, OTHER)
THRESHOLD = 5
RECORD = re.compile(r"(?P<name>\S+) (?P<salt>[0-9a-f]{32}) (?P<digest>[0-9a-f]{64})")

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


# Loads the shim and stays: prints "ready", then for each line of its stdin (a JSON list of PINs)
# logs in with each in turn, closing the session after a success (a logout), and prints the
# outcomes as JSON. The shim, and the SoftHSM2 copy under it, are initialised once, at the start.
RESIDENT_SCRIPT = r"""
import json, sys
import pkcs11
from pkcs11.exceptions import PKCS11Error
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    outcomes = []
    for pin in json.loads(line):
        try:
            token.open(user_pin=pin).close()
        except PKCS11Error as exc:
            outcomes.append(type(exc).__name__)
        else:
            outcomes.append("ok")
    print(json.dumps(outcomes), flush=True)
"""


@dataclass
class Resident:
    proc: subprocess.Popen[str]
    stderr: str = ""  # what it printed there, once the block using it has ended

    def logins(self, *pins: str) -> list[str]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(pins) + "\n")
        self.proc.stdin.flush()
        outcomes: list[str] = json.loads(self.proc.stdout.readline())
        return outcomes


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

    def cli(
        self, *args: str, role: str | None = None, pin: str | None = None, stdin: str = ""
    ) -> tuple[int, Any]:
        """Runs cloudhsm-cli with `stdin` as its standard input; returns (exit status, the `data`
        of its JSON)."""
        env = dict(self.env)
        if role is not None:
            env["CLOUDHSM_ROLE"] = role
        if pin is not None:
            env["CLOUDHSM_PIN"] = pin
        done = subprocess.run(
            [str(CLI), *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert "Traceback" not in done.stderr, done.stderr
        for secret in (*PASSWORDS, *self.token_pin()):
            assert secret not in done.stdout + done.stderr
        body = json.loads(done.stdout)
        assert set(body) == {"error_code", "data"}
        assert body["error_code"] == done.returncode, body
        assert done.returncode in (0, 1)
        if done.returncode:
            assert isinstance(body["data"], str)
            assert "\n" not in body["data"]
        return done.returncode, body["data"]

    def change(
        self, user: str, new: str | None, role: str, pin: str, stdin: str = ""
    ) -> tuple[int, Any]:
        """`user change-password`; with new=None the new password comes from `stdin`."""
        args = ("user", "change-password", "--username", user, "--role", "crypto-user")
        password = () if new is None else ("--password", new)
        return self.cli(*args, *password, role=role, pin=pin, stdin=stdin)

    def create(
        self, user: str, new: str | None, pin: str = f"admin:{SO_PIN}", stdin: str = ""
    ) -> tuple[int, Any]:
        args = ("user", "create", "--username", user, "--role", "crypto-user")
        password = () if new is None else ("--password", new)
        return self.cli(*args, *password, role="admin", pin=pin, stdin=stdin)

    def delete(self, user: str, pin: str = f"admin:{SO_PIN}") -> tuple[int, Any]:
        args = ("user", "delete", "--username", user, "--role", "crypto-user")
        return self.cli(*args, role="admin", pin=pin)

    def token_pin(self) -> list[str]:
        """The cluster's token-pin, without its newline: [] if there is none."""
        path = self.state / "token-pin"
        return [path.read_text().removesuffix("\n")] if path.exists() else []

    def user_lines(self) -> list[str]:
        return (self.state / "users").read_text().splitlines()

    def record_of(self, user: str) -> tuple[bytes, bytes] | None:
        """(salt, digest) of the user's line in `users`; None if the line is a bare name."""
        line = next(line for line in self.user_lines() if line.split()[0] == user)
        if line == user:
            return None
        match = RECORD.fullmatch(line)
        assert match is not None, line
        return bytes.fromhex(match["salt"]), bytes.fromhex(match["digest"])

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
    def resident(self) -> Iterator[Resident]:
        """A process with the shim loaded (initialised, not logged in) while the block runs."""
        proc = subprocess.Popen(
            [sys.executable, "-c", RESIDENT_SCRIPT, str(self.shim), LABEL],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        resident = Resident(proc)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield resident
        finally:
            try:  # end of its stdin: it finalises the module and exits
                resident.stderr = proc.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                proc.kill()
                resident.stderr = proc.communicate(timeout=30)[1]
        assert proc.returncode == 0, resident.stderr

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


def _digest(salt: bytes, user: str, password: str) -> bytes:
    return hashlib.sha256(salt + f"{user}:{password}".encode()).digest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_user_changes_its_own_password_into_a_record(cluster: Cluster) -> None:
    assert not (cluster.state / "users").exists()
    status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
    assert (status, data) == (0, {"username": "kmsuser", "role": "crypto-user"})
    assert cluster.shim_logins(f"kmsuser:{OLD}", f"kmsuser:{NEW}") == ["PinIncorrect", "ok"]
    # The old password was SoftHSM2's user PIN: it stays that, as the cluster's token-pin, and
    # kmsuser's password is a record now: "NAME SALT_HEX SHA256_HEX".
    assert (cluster.state / "token-pin").read_text() == f"{OLD}\n"
    record = cluster.record_of("kmsuser")
    assert record is not None
    salt, digest = record
    assert len(salt) == 16
    assert digest == _digest(salt, "kmsuser", NEW)
    assert cluster.user_lines() == [f"kmsuser {salt.hex()} {digest.hex()}"]
    for name in ("token-pin", "users"):
        assert _mode(cluster.state / name) == 0o600
    assert not [p.name for p in cluster.state.iterdir() if p.name.endswith(".tmp")]
    # A second change goes through the record; SoftHSM2's PIN and token-pin stay as they are.
    status, data = cluster.change("kmsuser", NEW2, "crypto-user", f"kmsuser:{NEW}")
    assert status == 0, data
    assert cluster.token_pin() == [OLD]
    assert cluster.record_of("kmsuser") != record
    assert cluster.shim_logins(f"kmsuser:{NEW}", f"kmsuser:{NEW2}") == ["PinIncorrect", "ok"]


def test_a_process_loaded_before_a_self_change_logs_in_with_the_new_password(
    cluster: Cluster,
) -> None:
    with cluster.resident() as used, cluster.resident() as fresh:
        assert used.logins(f"kmsuser:{OLD}") == ["ok"]  # logged in and out before the change
        status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
        assert status == 0, data
        # Neither re-initialises: the change is seen at once, as on a CloudHSM cluster.
        assert used.logins(f"kmsuser:{OLD}", f"kmsuser:{NEW}") == ["PinIncorrect", "ok"]
        assert fresh.logins(f"kmsuser:{NEW}", f"kmsuser:{OLD}") == ["ok", "PinIncorrect"]
        assert cluster.failures_file("kmsuser").read_text().strip() == "1"

        # Record to record, and a wrong old password counted as a failed login of the shim's.
        status, data = cluster.change("kmsuser", NEW2, "crypto-user", f"kmsuser:{OLD}")
        assert (status, data) == (
            1,
            "incorrect password for user kmsuser (2 failed logins, 3 left before lockout)",
        )
        status, data = cluster.change("kmsuser", NEW2, "crypto-user", f"kmsuser:{NEW}")
        assert status == 0, data
        assert not cluster.failures_file("kmsuser").exists()
        assert used.logins(f"kmsuser:{NEW}", f"kmsuser:{NEW2}") == ["PinIncorrect", "ok"]
        assert fresh.logins(f"kmsuser:{NEW2}") == ["ok"]
    assert "cloudhsm-shim" not in used.stderr + fresh.stderr


def test_an_admin_reset_with_a_token_pin_unlocks_a_user_for_running_processes(
    cluster: Cluster,
) -> None:
    _with_users(cluster, "kmsuser", "alice")
    status, data = cluster.change("alice", OTHER, "crypto-user", f"alice:{OLD}")
    assert status == 0, data
    assert cluster.token_pin() == [OLD]
    with cluster.resident() as running:
        wrong = ["alice:not-the-password"] * THRESHOLD
        assert running.logins(*wrong, f"alice:{OTHER}") == ["PinIncorrect"] * 5 + ["PinLocked"]
        assert cluster.users()["alice"]["locked"] == "true"
        status, data = cluster.change("alice", NEW, "crypto-user", f"alice:{OTHER}")
        assert status == 1
        assert data.startswith("user alice is locked after 5 failed logins")

        status, data = cluster.change("alice", NEW, "admin", "admin:wrong-so-pin")
        assert (status, data) == (1, "admin login failed: incorrect password for admin")
        assert cluster.users()["alice"]["locked"] == "true"
        status, data = cluster.change("alice", NEW, "admin", f"admin:{SO_PIN}")
        assert (status, data) == (0, {"username": "alice", "role": "crypto-user"})
        assert cluster.users()["alice"]["locked"] == "false"
        assert not cluster.failures_file("alice").exists()

        assert running.logins(f"alice:{OTHER}", f"alice:{NEW}") == ["PinIncorrect", "ok"]
        # SoftHSM2's PIN did not change: kmsuser, still passthrough, logs in as before.
        assert running.logins(f"kmsuser:{OLD}") == ["ok"]
    assert cluster.token_pin() == [OLD]
    assert cluster.record_of("kmsuser") is None
    assert cluster.shim_logins(f"alice:{NEW}", f"kmsuser:{OLD}") == ["ok", "ok"]


def test_an_admin_reset_on_a_passthrough_cluster_rekeys_the_token_pin(cluster: Cluster) -> None:
    _with_users(cluster, "kmsuser", "alice")
    wrong = ["alice:not-the-password"] * THRESHOLD
    assert cluster.shim_logins(*wrong, f"alice:{OLD}") == ["PinIncorrect"] * 5 + ["PinLocked"]
    with cluster.resident() as before:
        status, data = cluster.change("alice", NEW, "admin", f"admin:{SO_PIN}")
        assert (status, data) == (0, {"username": "alice", "role": "crypto-user"})
        assert cluster.users()["alice"]["locked"] == "false"
        # The admin does not know SoftHSM2's user PIN (every CU's password until now): a random
        # one replaced it, kept in token-pin, and the other CUs' passwords are unknown now.
        [internal] = cluster.token_pin()
        assert len(internal) == 24
        assert internal != OLD
        assert cluster.shim_logins(f"alice:{OLD}", f"alice:{NEW}", f"kmsuser:{OLD}") == [
            "PinIncorrect",
            "ok",
            "PinIncorrect",
        ]
        kmsuser = cluster.record_of("kmsuser")
        assert kmsuser is not None
        assert kmsuser[1] not in (_digest(kmsuser[0], "kmsuser", p) for p in PASSWORDS)
        # The one case where a process loaded before must re-initialise: its SoftHSM2 still has
        # the old PIN. The shim says so; it is not the user's failure.
        assert before.logins(f"alice:{NEW}") == ["GeneralError"]
        assert not cluster.failures_file("alice").exists()
    assert "token-pin" in before.stderr
    assert "re-initialise" in before.stderr

    # With token-pin there, a reset only writes the user's record.
    status, data = cluster.change("kmsuser", NEW2, "admin", f"admin:{SO_PIN}")
    assert status == 0, data
    assert cluster.token_pin() == [internal]
    assert cluster.shim_logins(f"kmsuser:{NEW2}", f"alice:{NEW}") == ["ok", "ok"]


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


def test_the_new_password_can_come_from_standard_input(cluster: Cluster) -> None:
    status, data = cluster.change("kmsuser", None, "crypto-user", f"kmsuser:{OLD}", f"{NEW}\n")
    assert status == 0, data
    assert cluster.shim_logins(f"kmsuser:{NEW}") == ["ok"]
    # A second line confirms the first, as the real tool's second prompt does.
    confirmed = f"{NEW2}\n{NEW2}\n"
    status, data = cluster.change("kmsuser", None, "crypto-user", f"kmsuser:{NEW}", confirmed)
    assert status == 0, data
    assert cluster.shim_logins(f"kmsuser:{NEW}", f"kmsuser:{NEW2}") == ["PinIncorrect", "ok"]

    refused = [
        (f"{OTHER}\n{NEW}\n", "passwords do not match"),
        (f"{OTHER}\n{OTHER}\n{OTHER}\n", "standard input has more than two lines"),
        ("", "no new password: give --password NEW or write it to standard input"),
        ("\n", "no new password"),
        ("short-7\n", "the new password must be 8 to 32 characters long (it has 7)"),
    ]
    for role, pin in (("crypto-user", f"kmsuser:{NEW2}"), ("admin", f"admin:{SO_PIN}")):
        for stdin, expected in refused:
            status, data = cluster.change("kmsuser", None, role, pin, stdin)
            assert status == 1, (role, stdin)
            assert data.startswith(expected), (role, stdin, data)
    assert not cluster.failures_file("kmsuser").exists()  # no refusal here counts a failure
    assert cluster.shim_logins(f"kmsuser:{NEW2}", f"kmsuser:{OTHER}") == ["ok", "PinIncorrect"]

    status, data = cluster.change("kmsuser", None, "admin", f"admin:{SO_PIN}", f"{OTHER}\r\n")
    assert status == 0, data
    assert cluster.shim_logins(f"kmsuser:{OTHER}") == ["ok"]


def test_an_admin_creates_and_deletes_users(cluster: Cluster) -> None:
    assert cluster.create("bob", NEW) == (
        1,
        "the cluster still uses SoftHSM2's PIN for its users; reset a user's password as "
        "admin first",
    )
    status, data = cluster.change("kmsuser", NEW, "crypto-user", f"kmsuser:{OLD}")
    assert status == 0, data

    assert cluster.create("bob", NEW, pin="admin:wrong-so-pin") == (
        1,
        "admin login failed: incorrect password for admin",
    )
    assert cluster.create("bob", None, stdin=f"{NEW2}\n{NEW2}\n") == (
        0,
        {"username": "bob", "role": "crypto-user"},
    )
    assert list(cluster.users()) == ["admin", "kmsuser", "bob"]
    assert cluster.shim_logins(f"bob:{OLD}", f"bob:{NEW2}", f"kmsuser:{NEW}") == [
        "PinIncorrect",
        "ok",
        "ok",
    ]
    for name in ("bob", "kmsuser"):
        assert cluster.create(name, OTHER) == (1, f"user {name} already exists")
    status, data = cluster.create("../bob", OTHER)
    assert status == 1
    assert data.startswith("invalid user name '../bob'")
    assert cluster.shim_logins(f"bob:{OTHER}") == ["PinIncorrect"]
    assert cluster.failures_file("bob").read_text().strip() == "1"

    with cluster.logged_in(f"bob:{NEW2}") as holder:
        assert cluster.delete("bob") == (
            1,
            f"user bob is logged in from another process (pid {holder.pid}); log it out first",
        )
    assert cluster.delete("bob") == (0, {"username": "bob", "role": "crypto-user"})
    assert list(cluster.users()) == ["admin", "kmsuser"]
    assert not cluster.failures_file("bob").exists()
    assert cluster.shim_logins(f"bob:{NEW2}", f"kmsuser:{NEW}") == ["UserPinNotInitialized", "ok"]
    assert cluster.delete("bob") == (1, "user bob not found")

    # A new bob starts afresh.
    assert cluster.create("bob", OTHER)[0] == 0
    assert cluster.shim_logins(f"bob:{NEW2}", f"bob:{OTHER}") == ["PinIncorrect", "ok"]


def test_deleting_the_implicit_kmsuser_leaves_no_users(cluster: Cluster) -> None:
    assert cluster.delete("kmsuser") == (0, {"username": "kmsuser", "role": "crypto-user"})
    assert (cluster.state / "users").read_text() == ""
    assert list(cluster.users()) == ["admin"]
    assert cluster.shim_logins(f"kmsuser:{OLD}") == ["UserPinNotInitialized"]


def test_a_malformed_line_is_refused_until_an_admin_resets_the_user(cluster: Cluster) -> None:
    _with_users(cluster, "kmsuser", "alice 00ff")
    status, data = cluster.change("alice", NEW, "crypto-user", f"alice:{OLD}")
    assert (status, data) == (
        1,
        "the users file has a malformed line for alice: an admin must reset its password",
    )
    assert cluster.shim_logins(f"alice:{OLD}") == ["GeneralError"]
    assert not cluster.failures_file("alice").exists()
    assert cluster.change("alice", NEW, "admin", f"admin:{SO_PIN}")[0] == 0
    assert cluster.shim_logins(f"alice:{NEW}") == ["ok"]


def test_cluster_id_names_the_token_when_the_conf_does_not(cluster: Cluster) -> None:
    conf = cluster.tmp / "shim.conf"
    conf.write_text(conf.read_text().replace(f"token_label = {LABEL}\n", ""))
    status, data = cluster.cli("user", "list")
    assert status == 1
    assert data.endswith("sets no token_label: name the cluster's token there or give --cluster-id")
    for args in (
        ("--cluster-id", LABEL, "user", "list"),
        ("user", "list", f"--cluster-id={LABEL}"),
    ):
        status, data = cluster.cli(*args)
        assert status == 0, data
        assert [u["username"] for u in data["users"]] == ["admin", "kmsuser"]
    change = ("user", "change-password", "--username", "kmsuser", "--role", "crypto-user")
    status, data = cluster.cli(
        "--cluster-id", LABEL, *change, role="crypto-user", pin=f"kmsuser:{OLD}", stdin=NEW
    )
    assert status == 0, data
    status, data = cluster.cli("--cluster-id", "other-cluster", "user", "list")
    assert (status, data[:37]) == (1, "no token labelled 'other-cluster' in ")

    conf.write_text(conf.read_text() + f"token_label = {LABEL}\n")
    status, data = cluster.cli("--cluster-id", "other-cluster", "user", "list")
    assert status == 1
    assert data.startswith("--cluster-id 'other-cluster' is not the cluster of ")


def test_usage_and_credential_errors_are_json_with_exit_status_1(cluster: Cluster) -> None:
    change = ("user", "change-password", "--username", "kmsuser", "--role", "crypto-user")
    create = ("user", "create", "--username", "bob", "--role", "crypto-user", "--password", NEW)
    delete = ("user", "delete", "--username", "kmsuser", "--role", "crypto-user")
    admin_role = ("user", "change-password", "--username", "admin", "--role", "admin")
    as_admin_role = (*admin_role, "--password", NEW)
    cu = f"kmsuser:{OLD}"
    cases: list[tuple[tuple[str, ...], str | None, str | None, str]] = [
        ((), None, None, "usage: cloudhsm-cli [--cluster-id ID] user list"),
        (("user",), None, None, "usage:"),
        (("user", "delete", "--username", "kmsuser"), None, None, "missing --role; usage:"),
        (("user", "list", "--verbose"), None, None, "unexpected argument '--verbose'; usage:"),
        (("--cluster-id",), None, None, "--cluster-id needs a value"),
        (("--cluster-id", LABEL, "user", "list", "--cluster-id", LABEL), None, None, "twice"),
        ((*change, "--password", NEW), None, None, "no credentials"),
        ((*change, "--password", NEW), "officer", f"admin:{SO_PIN}", "must be admin or crypto"),
        ((*change, "--password", NEW), "admin", SO_PIN, "CLOUDHSM_PIN must be name:password"),
        ((*change, "--password", NEW), "admin", f"root:{SO_PIN}", "only admin is 'admin'"),
        (change, "admin", f"admin:{SO_PIN}", "no new password: give --password NEW"),
        ((*change, "--password", NEW, "--force"), "admin", f"admin:{SO_PIN}", "'--force'"),
        (as_admin_role, "admin", f"admin:{SO_PIN}", "only crypto users are managed here"),
        (create, "crypto-user", cu, "only an admin may create users (CLOUDHSM_ROLE=admin)"),
        (delete, "crypto-user", cu, "only an admin may delete users (CLOUDHSM_ROLE=admin)"),
        ((*delete, "--password", NEW), "admin", f"admin:{SO_PIN}", "'--password'"),
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
