"""A stand-in for AWS's `cloudhsm-cli`, single-command mode, over the CloudHSM shim's token.

It owns the officer's and the crypto users' side of the shim's user model
(`cloudhsm_shim.c` next to this file): listing the crypto users (CUs) with their lockout and
login state, changing a CU's password - by an admin (SoftHSM2's security officer), which is
also how a locked CU is unlocked, or by the CU itself - and creating and deleting CUs. It reads
the shim's configuration (HSMBRIDGE_SHIM_CONF), talks to the real SoftHSM2 module the shim wraps
(`target`), never to the shim, and shares the shim's cross-process state under
STATE_DIR/<token label>/, all read and written under an exclusive flock of `.lock`, files
replaced atomically (a temporary file renamed in the same directory, mode 0600):

    users                 one CU a line: `NAME` (passthrough: the CU's password is SoftHSM2's
                          user PIN of the token, as a fresh cluster has it) or
                          `NAME SALT_HEX SHA256_HEX` (a password record: hex(SHA-256(SALT ||
                          NAME || ":" || PASSWORD)), SALT 16 random bytes). Missing: only
                          kmsuser, passthrough. The first line naming a user counts.
    token-pin             SoftHSM2's user PIN, the cluster's internal secret (followed by one
                          newline), which the shim logs in with for a CU that has a record.
                          Written once, never changed.
    failed-logins/<user>  failed logins in a row; logins/<user>.<pid>: processes logged in.

Why records: SoftHSM2 reads a token's PIN when a process initialises it, so after a C_SetPIN a
process that loaded it before goes on accepting the old PIN and refusing the new one. CloudHSM
checks passwords on the cluster, so a change is seen by every process at once; the shim does
the same by checking records itself, and a password change writes a record instead of touching
SoftHSM2's PIN:

  - A CU's own change (CLOUDHSM_PIN=U:OLD) verifies OLD as the shim would (against U's record,
    or, passthrough, by a SoftHSM2 login in this process; a wrong OLD counts toward lockout
    like a failed shim login). A passthrough U's OLD is SoftHSM2's PIN: it becomes `token-pin`
    if there is none yet. Then U gets a record of the new password.
  - An admin's change (CLOUDHSM_PIN=admin:SO_PIN; the SO PIN is checked by an SO login) writes
    U's record and clears U's failed logins, which unlocks U. On a cluster without `token-pin`
    (all CUs passthrough; the admin does not know their PIN) it first re-keys: SoftHSM2's user
    PIN is set (C_InitPIN) to a random 24-character one kept in `token-pin`, and every other
    passthrough CU gets a record of a random password (an admin must reset those too). That is
    the one case where processes that loaded the module before must re-initialise (their
    SoftHSM2 still has the old PIN; the shim answers them CKR_GENERAL_ERROR);
    `hsmbridge init --hsm cloudhsm-shim` avoids it by writing `token-pin` and a kmsuser record
    up front.

    cloudhsm-cli user list
    cloudhsm-cli user change-password --username U --role crypto-user [--password NEW]
    cloudhsm-cli user create --username U --role crypto-user [--password NEW]      (admin)
    cloudhsm-cli user delete --username U --role crypto-user                       (admin)

`--cluster-id ID` (before the command or among its options) names the cluster: the token labelled
ID, as `hsmbridge init` labels a cluster's token; it must agree with the conf's `token_label`
if that is set, and is needed if it is not.

Without --password the new password is read from standard input, as the real tool prompts for
it: its first line, and a second line, if there is one, must repeat it (on a terminal both are
prompted for). Passwords are 8 to 32 printable characters. `user create` needs `token-pin` (a
CU with a record); `user delete` and `user change-password` refuse while the user is logged in
from another process; `user create` refuses an existing user.

Credentials come from CLOUDHSM_ROLE (`admin` or `crypto-user`) and CLOUDHSM_PIN (`name:password`;
the admin is `admin` with SoftHSM2's SO PIN). Output is JSON on stdout, as the real tool prints
it: `{"error_code": 0, "data": ...}` with exit status 0, or `{"error_code": 1, "data": "<message>"}`
with exit status 1. No password is ever printed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pkcs11.types import Session, Token

DEFAULT_TARGET = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_LOCKOUT_THRESHOLD = 5  # CloudHSM's, and the shim's default
DEFAULT_USER = "kmsuser"  # the only CU when the `users` file is missing
ADMIN_NAME = "admin"  # the one admin: SoftHSM2's security officer
MAX_LABEL_BYTES = 32  # CK_TOKEN_INFO.label
MAX_USER = 31  # the shim's longest user name
MAX_LOGIN_PIN_BYTES = 128  # the shim's longest "USER:password"
PASSWORD_MIN, PASSWORD_MAX = 8, 32  # CloudHSM's password rule
SALT_BYTES = 16  # of a password record
TOKEN_PIN_CHARS = 24  # of the random SoftHSM2 user PIN an admin re-key sets
ROLE_ADMIN, ROLE_CU = "admin", "crypto-user"
USERS_FILE, TOKEN_PIN_FILE = "users", "token-pin"
USAGE = (
    "usage: cloudhsm-cli [--cluster-id ID] user list | cloudhsm-cli [--cluster-id ID] user "
    "change-password|create --username NAME --role crypto-user [--password NEW, else read from "
    "standard input] | cloudhsm-cli [--cluster-id ID] user delete --username NAME --role "
    "crypto-user (credentials in CLOUDHSM_ROLE=admin|crypto-user and "
    "CLOUDHSM_PIN=name:password)"
)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LEADING_INT = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+)")
_FIELD_SEPARATORS = re.compile(r"[ \t\r]+")  # the shim's strtok(" \t\r\n") on one line
_HEX = re.compile(r"[0-9A-Fa-f]+")
_secrets_seen: list[str] = []  # passwords read from stdin or drawn here, for scrubbing messages


class CliError(Exception):
    """A failure reported as `{"error_code": 1, "data": message}`; message is one line."""


# ---- the shim's configuration -------------------------------------------------------------------


def _trim(text: str) -> str:
    """The shim's trim(): trailing blanks and line ends, leading blanks."""
    return text.rstrip(" \t\n\r").lstrip(" \t")


def _leading_int(text: str) -> int | None:
    """The integer at the start of text, as C's atoi/fscanf("%d") read it; None if there is none."""
    match = _LEADING_INT.match(text)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ShimConf:
    path: str
    target: str
    state_dir: str
    token_label: str
    lockout_threshold: int


def load_conf(environ: Mapping[str, str], cluster_id: str | None = None) -> ShimConf:
    """The shim's settings from the file HSMBRIDGE_SHIM_CONF names, parsed as the shim does;
    `cluster_id` (--cluster-id) names the cluster's token when the file does not."""
    path = environ.get("HSMBRIDGE_SHIM_CONF", "")
    if not path:
        raise CliError("HSMBRIDGE_SHIM_CONF is not set: point it at the CloudHSM shim's conf file")
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CliError(f"cannot read the shim conf {path}: {exc.strerror}") from None
    # Relative paths are relative to the conf file's directory as the shim spells it.
    base = path.rsplit("/", 1)[0] if "/" in path else ""

    def resolve(value: str) -> str:
        return value if value.startswith("/") or not base else f"{base}/{value}"

    settings = {"target": DEFAULT_TARGET, "state_dir": "", "token_label": ""}
    threshold = DEFAULT_LOCKOUT_THRESHOLD
    for raw in text.splitlines():
        line = raw.split("#", 1)[0]
        if "=" not in line:
            continue
        key, value = (_trim(part) for part in line.split("=", 1))
        if key in ("target", "state_dir"):
            settings[key] = resolve(value)
        elif key == "token_label":
            # The shim keeps at most 32 bytes of it.
            cut = value.encode("utf-8")[:MAX_LABEL_BYTES]
            settings[key] = cut.decode("utf-8", errors="ignore")
        elif key == "lockout_threshold":
            threshold = _leading_int(value) or 0
    if cluster_id is not None:
        if settings["token_label"] and settings["token_label"] != cluster_id:
            raise CliError(
                f"--cluster-id {cluster_id!r} is not the cluster of {path} "
                f"(token_label = {settings['token_label']!r})"
            )
        settings["token_label"] = cluster_id
    if not settings["token_label"]:
        raise CliError(
            f"{path} sets no token_label: name the cluster's token there or give --cluster-id"
        )
    if not settings["state_dir"]:
        raise CliError(
            f"{path} sets no state_dir: without it the shim keeps no shared user state to manage"
        )
    return ShimConf(
        path=path,
        target=settings["target"],
        state_dir=settings["state_dir"],
        token_label=settings["token_label"],
        lockout_threshold=threshold,
    )


# ---- the shim's cross-process state -------------------------------------------------------------


def valid_name(name: str) -> bool:
    """The shim's valid_name() for user names."""
    return (
        0 < len(name) <= MAX_USER and _NAME.fullmatch(name) is not None and not name.startswith(".")
    )


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0 or -n) would signal a process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    try:  # an exited process its parent has not reaped yet is logged in no more
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _password_digest(salt: bytes, user: str, password: str) -> bytes:
    """SHA-256(SALT || NAME || ":" || PASSWORD), over the bytes the shim's C_Login is given."""
    data = salt + user.encode() + b":" + password.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class PasswordRecord:
    salt: bytes
    digest: bytes

    @classmethod
    def of(cls, user: str, password: str) -> PasswordRecord:
        salt = secrets.token_bytes(SALT_BYTES)
        return cls(salt, _password_digest(salt, user, password))

    def matches(self, user: str, password: str) -> bool:
        return hmac.compare_digest(_password_digest(self.salt, user, password), self.digest)

    def line(self, user: str) -> str:
        return f"{user} {self.salt.hex()} {self.digest.hex()}"


@dataclass(frozen=True)
class UserEntry:
    """A CU as its line of `users` makes it: passthrough, with a record, or a malformed line."""

    kind: Literal["passthrough", "record", "malformed"]
    record: PasswordRecord | None = None


def _hex_bytes(text: str, size: int) -> bytes | None:
    if len(text) != 2 * size or not _HEX.fullmatch(text):
        return None
    return bytes.fromhex(text)


def _parse_user_line(line: str) -> tuple[str, UserEntry] | None:
    """(name, entry) of one line of `users` as the shim's find_user() reads it; None if blank."""
    fields = [f for f in _FIELD_SEPARATORS.split(line) if f]
    if not fields:
        return None
    if len(fields) == 1:
        return fields[0], UserEntry("passthrough")
    if len(fields) == 3:
        salt, digest = _hex_bytes(fields[1], SALT_BYTES), _hex_bytes(fields[2], 32)
        if salt is not None and digest is not None:
            return fields[0], UserEntry("record", PasswordRecord(salt, digest))
    return fields[0], UserEntry("malformed")


def _line_name(line: str) -> str | None:
    parsed = _parse_user_line(line)
    return None if parsed is None else parsed[0]


def _write_atomically(path: Path, data: bytes) -> None:
    """Replaces path by a file holding data, mode 0600, through a rename in its directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


class ClusterState:
    """STATE_DIR/<token>/ as the shim keeps it; methods other than `locked` expect the lock held."""

    def __init__(self, root: Path, lockout_threshold: int) -> None:
        self.root = root
        self.lockout_threshold = lockout_threshold

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The exclusive flock the shim takes around every read-modify-write of this state."""
        import fcntl

        # Private like the module's own: the cluster's token PIN and password records live here.
        for directory in (
            self.root.parent,
            self.root,
            self.root / "failed-logins",
            self.root / "logins",
        ):
            directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _user_lines(self) -> list[str]:
        """The lines of `users`; a missing file is the one line `kmsuser`."""
        try:
            text = (self.root / USERS_FILE).read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            return [DEFAULT_USER]
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")

    def entries(self) -> dict[str, UserEntry]:
        """The CUs in file order; the first line naming one counts, invalid names none."""
        found: dict[str, UserEntry] = {}
        for line in self._user_lines():
            parsed = _parse_user_line(line)
            if parsed is not None and valid_name(parsed[0]) and parsed[0] not in found:
                found[parsed[0]] = parsed[1]
        return found

    def users(self) -> list[str]:
        return list(self.entries())

    def entry(self, user: str) -> UserEntry:
        found = self.entries().get(user)
        if found is None:
            raise CliError(f"user {user} not found")
        return found

    def _write_users(self, lines: list[str]) -> None:
        text = "".join(f"{line}\n" for line in lines)
        _write_atomically(self.root / USERS_FILE, text.encode("utf-8", "surrogateescape"))

    def set_records(self, records: Mapping[str, PasswordRecord]) -> None:
        """Each named user's line becomes its record (the first line naming it; appended if none
        does); every other line stays as it is."""
        lines, done = self._user_lines(), set()
        for i, line in enumerate(lines):
            parsed = _parse_user_line(line)
            if parsed is not None and parsed[0] in records and parsed[0] not in done:
                lines[i] = records[parsed[0]].line(parsed[0])
                done.add(parsed[0])
        lines.extend(record.line(user) for user, record in records.items() if user not in done)
        self._write_users(lines)

    def remove_user(self, user: str) -> None:
        """Every line naming user goes (a later one would name it again)."""
        kept = [line for line in self._user_lines() if _line_name(line) != user]
        self._write_users(kept)

    def has_token_pin(self) -> bool:
        return (self.root / TOKEN_PIN_FILE).exists()

    def write_token_pin(self, pin: str) -> None:
        """The cluster's SoftHSM2 user PIN; written once: never over an existing one."""
        if self.has_token_pin():
            raise CliError(f"{self.root / TOKEN_PIN_FILE} exists already; it is never replaced")
        _write_atomically(
            self.root / TOKEN_PIN_FILE, pin.encode("utf-8", "surrogateescape") + b"\n"
        )

    def failures(self, user: str) -> int:
        try:
            text = (self.root / "failed-logins" / user).read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return _leading_int(text) or 0

    def set_failures(self, user: str, count: int) -> None:
        path = self.root / "failed-logins" / user
        if count == 0:
            path.unlink(missing_ok=True)
        else:
            _write_atomically(path, f"{count}\n".encode())

    def is_locked(self, user: str) -> bool:
        return self.lockout_threshold > 0 and self.failures(user) >= self.lockout_threshold

    def live_logins(self) -> dict[str, list[int]]:
        """User -> pids of live processes logged in as it; markers of dead ones are removed."""
        logins: dict[str, list[int]] = {}
        for entry in sorted(os.listdir(self.root / "logins")):
            user, dot, pid_text = entry.rpartition(".")
            if not dot or not user or not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if _process_alive(pid):
                logins.setdefault(user, []).append(pid)
            else:
                (self.root / "logins" / entry).unlink(missing_ok=True)
        return logins


# ---- the token ---------------------------------------------------------------------------------


def _hsm_error(action: str, exc: Exception) -> CliError:
    return CliError(f"HSM error while {action}: {type(exc).__name__}")


def find_token(conf: ShimConf) -> tuple[Token, str]:
    """The token labelled conf.token_label in the real module, and its state directory name."""
    try:
        import pkcs11
        from pkcs11.exceptions import PKCS11Error, TokenNotPresent, TokenNotRecognised
    except ImportError as exc:
        raise CliError(f"python-pkcs11 is not importable by {sys.executable}: {exc}") from None
    try:
        lib = pkcs11.lib(conf.target)
        found: list[tuple[int, Token]] = []
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except (TokenNotPresent, TokenNotRecognised):
                continue
            if _trim(token.label) == conf.token_label:
                found.append((slot.slot_id, token))
    except PKCS11Error as exc:
        raise CliError(f"cannot use the HSM module {conf.target}: {type(exc).__name__}") from None
    if not found:
        raise CliError(
            f"no token labelled {conf.token_label!r} in {conf.target} "
            f"(SOFTHSM2_CONF={os.environ.get('SOFTHSM2_CONF', '<unset>')})"
        )
    if len(found) > 1:
        raise CliError(f"{len(found)} tokens are labelled {conf.token_label!r}; labels must differ")
    slot_id, token = found[0]
    # As the shim's session_token() names the directory.
    name = _trim(token.label).replace("/", "_")
    if not name or name.startswith("."):
        name = f"token-{slot_id}"
    return token, name


def _login(token: Token, *, so_pin: str | None = None, user_pin: str | None = None) -> Session:
    """A read-write session logged in as SO or user; PKCS11Error subclasses propagate."""
    if so_pin is not None:
        return token.open(rw=True, so_pin=so_pin)
    return token.open(rw=True, user_pin=user_pin)


# ---- commands ----------------------------------------------------------------------------------


def _flag(value: bool) -> str:
    return "true" if value else "false"


def user_list(conf: ShimConf) -> dict[str, Any]:
    _token, name = find_token(conf)
    state = ClusterState(Path(conf.state_dir) / name, conf.lockout_threshold)
    users: list[dict[str, str]] = [{"username": ADMIN_NAME, "role": ROLE_ADMIN, "locked": "false"}]
    with state.locked():
        logins = state.live_logins()
        for user in state.users():
            users.append(
                {
                    "username": user,
                    "role": ROLE_CU,
                    "locked": _flag(state.is_locked(user)),
                    "logged-in": _flag(bool(logins.get(user))),
                }
            )
    return {"users": users}


def _options(args: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """`--name value` or `--name=value` pairs; each of names at most once, nothing else."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key not in names:
            raise CliError(f"unexpected argument {key!r}; {USAGE}")
        if not eq:
            if i + 1 >= len(args):
                raise CliError(f"{key} needs a value; {USAGE}")
            i += 1
            value = args[i]
        if key in found:
            raise CliError(f"{key} given twice; {USAGE}")
        found[key] = value
        i += 1
    return found


def _credentials(environ: Mapping[str, str]) -> tuple[str, str, str]:
    role = environ.get("CLOUDHSM_ROLE", "")
    pin = environ.get("CLOUDHSM_PIN", "")
    if not role or not pin:
        raise CliError(
            "no credentials: set CLOUDHSM_ROLE (admin or crypto-user) and CLOUDHSM_PIN "
            "(name:password)"
        )
    if role not in (ROLE_ADMIN, ROLE_CU):
        raise CliError(f"CLOUDHSM_ROLE is {role!r}; it must be admin or crypto-user")
    name, colon, password = pin.partition(":")
    if not colon or not name or not password:
        raise CliError("CLOUDHSM_PIN must be name:password")
    if role == ROLE_ADMIN and name != ADMIN_NAME:
        raise CliError(f"unknown admin {name!r}: this cluster's only admin is {ADMIN_NAME!r}")
    return role, name, password


def _check_new_password(user: str, password: str) -> None:
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise CliError(
            f"the new password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long "
            f"(it has {len(password)})"
        )
    if not password.isprintable():
        raise CliError("the new password must consist of printable characters")
    if len(f"{user}:{password}".encode()) > MAX_LOGIN_PIN_BYTES:
        raise CliError(
            f"{user}:<new password> must fit in {MAX_LOGIN_PIN_BYTES} bytes of UTF-8 for "
            "the PKCS#11 login: use fewer non-ASCII characters"
        )


def _new_password(opts: Mapping[str, str]) -> str:
    """--password, else standard input: its first line, repeated by the second if there is one
    (on a terminal, prompted for twice)."""
    if "--password" in opts:
        return opts["--password"]
    if sys.stdin is None:
        raise CliError("no new password: give --password NEW or write it to standard input")
    if sys.stdin.isatty():
        import getpass

        lines = [getpass.getpass("Enter password: "), getpass.getpass("Confirm password: ")]
    else:
        lines = sys.stdin.read().split("\n")
        while lines and not lines[-1]:
            lines.pop()
        lines = [line.removesuffix("\r") for line in lines]
    _secrets_seen.extend(line for line in lines if line)
    if not lines or not lines[0]:
        raise CliError("no new password: give --password NEW or write it to standard input")
    if len(lines) > 2:
        raise CliError(
            "standard input has more than two lines: give the new password, then optionally "
            "the same again"
        )
    if len(lines) == 2 and lines[1] != lines[0]:
        raise CliError("passwords do not match")
    return lines[0]


def _require_logged_out(state: ClusterState, user: str) -> None:
    others = [pid for pid in state.live_logins().get(user, []) if pid != os.getpid()]
    if others:
        raise CliError(
            f"user {user} is logged in from another process (pid {others[0]}); log it out first"
        )


@dataclass(frozen=True)
class _Request:
    """A user command's checked arguments and credentials."""

    user: str
    cluster_id: str | None
    login_role: str
    login_name: str
    password: str  # of the caller: the SO PIN, or the CU's old password
    new: str | None  # the new password, for commands that set one


def _request(
    environ: Mapping[str, str],
    args: Sequence[str],
    cluster_id: str | None,
    *,
    new: bool,
    admin_only: str | None,
) -> _Request:
    names = ["--username", "--role", "--cluster-id"] + (["--password"] if new else [])
    opts = _options(args, names)
    cluster_id = _one_cluster_id(cluster_id, opts)
    missing = [k for k in ("--username", "--role") if k not in opts]
    if missing:
        raise CliError(f"missing {', '.join(missing)}; {USAGE}")
    user, role = opts["--username"], opts["--role"]
    if role != ROLE_CU:
        raise CliError(f"--role {role!r} is not supported: only crypto users are managed here")
    login_role, login_name, password = _credentials(environ)
    if admin_only is not None and login_role != ROLE_ADMIN:
        raise CliError(f"only an admin may {admin_only} (CLOUDHSM_ROLE=admin)")
    if login_role == ROLE_CU and login_name != user:
        raise CliError(
            f"crypto user {login_name} may change only its own password, not {user}'s; "
            "an admin changes another user's password"
        )
    new_password = _new_password(opts) if new else None
    if new_password is not None:
        _check_new_password(user, new_password)
    return _Request(user, cluster_id, login_role, login_name, password, new_password)


def _one_cluster_id(leading: str | None, opts: Mapping[str, str]) -> str | None:
    if leading is not None and "--cluster-id" in opts:
        raise CliError(f"--cluster-id given twice; {USAGE}")
    return opts.get("--cluster-id", leading)


def _cluster(environ: Mapping[str, str], cluster_id: str | None) -> tuple[Token, ClusterState]:
    conf = load_conf(environ, cluster_id)
    token, name = find_token(conf)
    return token, ClusterState(Path(conf.state_dir) / name, conf.lockout_threshold)


def change_password(
    environ: Mapping[str, str], args: Sequence[str], cluster_id: str | None = None
) -> dict[str, str]:
    req = _request(environ, args, cluster_id, new=True, admin_only=None)
    assert req.new is not None
    token, state = _cluster(environ, req.cluster_id)
    if req.login_role == ROLE_ADMIN:
        _admin_change(token, state, req.user, req.password, req.new)
    else:
        _self_change(token, state, req.user, req.password, req.new)
    return {"username": req.user, "role": ROLE_CU}


def create_user(
    environ: Mapping[str, str], args: Sequence[str], cluster_id: str | None = None
) -> dict[str, str]:
    req = _request(environ, args, cluster_id, new=True, admin_only="create users")
    assert req.new is not None
    if not valid_name(req.user):
        raise CliError(
            f"invalid user name {req.user!r}: 1 to {MAX_USER} of A-Z a-z 0-9 _ . -, not "
            "starting with '.'"
        )
    token, state = _cluster(environ, req.cluster_id)
    with state.locked(), _so_session(token, req.password):
        if req.user in state.entries():
            raise CliError(f"user {req.user} already exists")
        if not state.has_token_pin():
            raise CliError(
                "the cluster still uses SoftHSM2's PIN for its users; reset a user's password "
                "as admin first"
            )
        state.set_records({req.user: PasswordRecord.of(req.user, req.new)})
        state.set_failures(req.user, 0)  # a count left by an earlier user of that name
    return {"username": req.user, "role": ROLE_CU}


def delete_user(
    environ: Mapping[str, str], args: Sequence[str], cluster_id: str | None = None
) -> dict[str, str]:
    req = _request(environ, args, cluster_id, new=False, admin_only="delete users")
    token, state = _cluster(environ, req.cluster_id)
    with state.locked(), _so_session(token, req.password):
        state.entry(req.user)
        _require_logged_out(state, req.user)
        state.remove_user(req.user)
        state.set_failures(req.user, 0)
    return {"username": req.user, "role": ROLE_CU}


@contextmanager
def _so_session(token: Token, so_pin: str) -> Iterator[Session]:
    """A session logged in as the security officer (the admin), closed afterwards."""
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PinLocked, PKCS11Error

    try:
        session = _login(token, so_pin=so_pin)
    except (PinIncorrect, PinLenRange):
        raise CliError(f"admin login failed: incorrect password for {ADMIN_NAME}") from None
    except PinLocked:
        raise CliError(f"admin {ADMIN_NAME} is locked on the HSM") from None
    except PKCS11Error as exc:
        raise _hsm_error(f"logging in as {ADMIN_NAME}", exc) from None
    try:
        yield session
    finally:
        _close(session)


def _admin_change(token: Token, state: ClusterState, user: str, so_pin: str, new: str) -> None:
    """The user's record of `new`, and its failed logins reset (an unlock); on a cluster without
    token-pin, SoftHSM2's user PIN re-keyed first (C_InitPIN as the officer)."""
    from pkcs11.exceptions import PKCS11Error

    with state.locked(), _so_session(token, so_pin) as session:
        state.entry(user)
        records = {user: PasswordRecord.of(user, new)}
        # An officer's reset of a user logged in elsewhere is allowed, as on CloudHSM: the
        # sessions it has go on, and its next login needs the new password. (Only the user's own
        # change is refused then: that is what KMS reports as USER_LOGGED_IN.)
        if not state.has_token_pin():
            # Re-keying SoftHSM2's PIN would leave a running process's later logins refused.
            _require_logged_out(state, user)
            # Passthrough: every CU's password is SoftHSM2's user PIN, which the admin does not
            # know. A random one becomes the cluster's; the other passthrough CUs, whose
            # password it was, get records nobody knows (an admin must reset them too).
            internal = secrets.token_urlsafe(TOKEN_PIN_CHARS * 3 // 4)  # 4 chars per 3 bytes
            _secrets_seen.append(internal)
            try:
                session.init_pin(internal)
            except PKCS11Error as exc:
                raise _hsm_error("re-keying the token's user PIN", exc) from None
            state.write_token_pin(internal)
            for other, entry in state.entries().items():
                if other != user and entry.kind == "passthrough":
                    records[other] = PasswordRecord.of(other, secrets.token_urlsafe(24))
        state.set_records(records)
        state.set_failures(user, 0)


def _self_change(token: Token, state: ClusterState, user: str, old: str, new: str) -> None:
    """`old` checked as the shim checks it, a failure counted as the shim counts it; then the
    user's record of `new` (and a passthrough user's `old`, SoftHSM2's PIN, as token-pin)."""
    with state.locked():
        entry = state.entry(user)
        failures = state.failures(user)
        if state.is_locked(user):
            raise CliError(
                f"user {user} is locked after {failures} failed logins; an admin must reset "
                "its password (user change-password with CLOUDHSM_ROLE=admin)"
            )
        _require_logged_out(state, user)
        if entry.kind == "malformed":
            raise CliError(
                f"the users file has a malformed line for {user}: an admin must reset its password"
            )
        if entry.record is not None:
            right = entry.record.matches(user, old)
        else:
            right = _softhsm_user_login(token, user, old)
        if not right:
            failures += 1
            state.set_failures(user, failures)
            threshold = state.lockout_threshold
            if threshold > 0 and failures >= threshold:
                raise CliError(
                    f"incorrect password for user {user}; {user} is now locked after "
                    f"{failures} failed logins: an admin must reset its password"
                )
            plural = "" if failures == 1 else "s"
            left = f", {threshold - failures} left before lockout" if threshold > 0 else ""
            raise CliError(
                f"incorrect password for user {user} ({failures} failed login{plural}{left})"
            )
        state.set_failures(user, 0)
        if entry.kind == "passthrough" and not state.has_token_pin():
            state.write_token_pin(old)  # verified: it is SoftHSM2's user PIN
        state.set_records({user: PasswordRecord.of(user, new)})


def _softhsm_user_login(token: Token, user: str, pin: str) -> bool:
    """Whether SoftHSM2 takes `pin` as its user PIN (a login in this fresh process)."""
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PKCS11Error

    try:
        session = _login(token, user_pin=pin)
    except (PinIncorrect, PinLenRange):
        return False
    except PKCS11Error as exc:
        raise _hsm_error(f"logging in as {user}", exc) from None
    _close(session)
    return True


def _close(session: Session) -> None:
    from pkcs11.exceptions import PKCS11Error

    with suppress(PKCS11Error):  # the process ends next; SoftHSM2 drops the session with it
        session.close()


# ---- entry point ------------------------------------------------------------------------------


def run(args: Sequence[str], environ: Mapping[str, str]) -> Any:
    args = list(args)
    cluster_id = None  # `--cluster-id ID` before the command, or among its options
    if args and args[0].partition("=")[0] == "--cluster-id":
        width = 1 if "=" in args[0] else 2
        cluster_id = _options(args[:width], ("--cluster-id",))["--cluster-id"]
        args = args[width:]
    match args:
        case ["user", "list", *rest]:
            opts = _options(rest, ("--cluster-id",))
            return user_list(load_conf(environ, _one_cluster_id(cluster_id, opts)))
        case ["user", "change-password", *rest]:
            return change_password(environ, rest, cluster_id)
        case ["user", "create", *rest]:
            return create_user(environ, rest, cluster_id)
        case ["user", "delete", *rest]:
            return delete_user(environ, rest, cluster_id)
        case _:
            raise CliError(USAGE)


def _secrets(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Every string that may be a password, for scrubbing from messages."""
    found = [environ.get("CLOUDHSM_PIN", "").partition(":")[2], *_secrets_seen]
    for i, arg in enumerate(args):
        if arg == "--password" and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--password="):
            found.append(arg.partition("=")[2])
    return sorted((s for s in found if s), key=len, reverse=True)


def _emit(code: int, data: Any) -> None:
    sys.stdout.write(json.dumps({"error_code": code, "data": data}, indent=2) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    try:
        data = run(args, env)
    except CliError as exc:
        message = str(exc)
    except KeyboardInterrupt:
        message = "interrupted"
    except Exception as exc:  # never a traceback: the caller reads JSON
        message = f"unexpected {type(exc).__name__}: {exc}"
        for secret in _secrets(args, env):  # our own messages never hold one; this may
            message = message.replace(secret, "<password>")
    else:
        _emit(0, data)
        return 0
    _emit(1, " ".join(message.split()))
    return 1


if __name__ == "__main__":
    sys.exit(main())
