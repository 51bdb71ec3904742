"""A stand-in for AWS's `cloudhsm-cli`, single-command mode, over the CloudHSM shim's token.

It owns the officer's and the crypto users' side of the shim's user model
(`cloudhsm_shim.c` next to this file): listing the crypto users (CUs) with their lockout and
login state, and changing a CU's password - by an admin (SoftHSM2's security officer), which is
also how a locked CU is unlocked, or by the CU itself. It reads the shim's configuration
(HSMBRIDGE_SHIM_CONF), talks to the real SoftHSM2 module the shim wraps (`target`), never to the
shim, and shares the shim's cross-process state under STATE_DIR/<token label>/ with the shim's
rules: `users`, `failed-logins/<user>`, `logins/<user>.<pid>`, all read and written under an
exclusive flock of `.lock`. All CUs of a token share SoftHSM2's one user PIN.

    cloudhsm-cli user list
    cloudhsm-cli user change-password --username U --role crypto-user --password NEW

Credentials come from CLOUDHSM_ROLE (`admin` or `crypto-user`) and CLOUDHSM_PIN (`name:password`;
the admin is `admin` with SoftHSM2's SO PIN). Output is JSON on stdout, as the real tool prints
it: `{"error_code": 0, "data": ...}` with exit status 0, or `{"error_code": 1, "data": "<message>"}`
with exit status 1. No password is ever printed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
ROLE_ADMIN, ROLE_CU = "admin", "crypto-user"
USAGE = (
    "usage: cloudhsm-cli user list | cloudhsm-cli user change-password --username NAME "
    "--role crypto-user --password NEW (credentials in CLOUDHSM_ROLE=admin|crypto-user and "
    "CLOUDHSM_PIN=name:password)"
)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LEADING_INT = re.compile(r"[ \t\n\r\f\v]*([+-]?[0-9]+)")


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


def load_conf(environ: Mapping[str, str]) -> ShimConf:
    """The shim's settings from the file HSMBRIDGE_SHIM_CONF names, parsed as the shim does."""
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
    if not settings["token_label"]:
        raise CliError(f"{path} sets no token_label: name the cluster's token there")
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


class ClusterState:
    """STATE_DIR/<token>/ as the shim keeps it; methods other than `locked` expect the lock held."""

    def __init__(self, root: Path, lockout_threshold: int) -> None:
        self.root = root
        self.lockout_threshold = lockout_threshold

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The exclusive flock the shim takes around every read-modify-write of this state."""
        import fcntl

        for sub in ("failed-logins", "logins"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def users(self) -> list[str]:
        try:
            text = (self.root / "users").read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return [DEFAULT_USER]
        names: list[str] = []
        for line in text.splitlines():
            name = _trim(line)
            if valid_name(name) and name not in names:
                names.append(name)
        return names

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
            path.write_text(f"{count}\n")

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


def _require_user(state: ClusterState, user: str) -> None:
    if user not in state.users():
        raise CliError(f"user {user} not found")


def _require_logged_out(state: ClusterState, user: str) -> None:
    others = [pid for pid in state.live_logins().get(user, []) if pid != os.getpid()]
    if others:
        raise CliError(
            f"user {user} is logged in from another process (pid {others[0]}); log it out first"
        )


def change_password(conf_env: Mapping[str, str], args: Sequence[str]) -> dict[str, str]:
    opts = _options(args, ("--username", "--role", "--password"))
    missing = [k for k in ("--username", "--role", "--password") if k not in opts]
    if missing:
        raise CliError(f"missing {', '.join(missing)}; {USAGE}")
    user, role, new = opts["--username"], opts["--role"], opts["--password"]
    if role != ROLE_CU:
        raise CliError(f"--role {role!r} is not supported: only crypto-user passwords change here")
    login_role, login_name, password = _credentials(conf_env)
    if login_role == ROLE_CU and login_name != user:
        raise CliError(
            f"crypto user {login_name} may change only its own password, not {user}'s; "
            "an admin changes another user's password"
        )
    _check_new_password(user, new)
    conf = load_conf(conf_env)
    token, name = find_token(conf)
    state = ClusterState(Path(conf.state_dir) / name, conf.lockout_threshold)
    if login_role == ROLE_ADMIN:
        _admin_change(token, state, user, password, new)
    else:
        _self_change(token, state, user, password, new)
    return {"username": user, "role": ROLE_CU}


def _admin_change(token: Token, state: ClusterState, user: str, so_pin: str, new: str) -> None:
    """C_InitPIN as the security officer, then the user's failed logins reset (an unlock)."""
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PinLocked, PKCS11Error

    with state.locked():
        try:
            session = _login(token, so_pin=so_pin)
        except (PinIncorrect, PinLenRange):
            raise CliError(f"admin login failed: incorrect password for {ADMIN_NAME}") from None
        except PinLocked:
            raise CliError(f"admin {ADMIN_NAME} is locked on the HSM") from None
        except PKCS11Error as exc:
            raise _hsm_error(f"logging in as {ADMIN_NAME}", exc) from None
        try:
            _require_user(state, user)
            _require_logged_out(state, user)
            try:
                session.init_pin(new)
            except PKCS11Error as exc:
                raise _hsm_error(f"setting {user}'s password", exc) from None
            state.set_failures(user, 0)
        finally:
            _close(session)


def _self_change(token: Token, state: ClusterState, user: str, old: str, new: str) -> None:
    """A user login counted as the shim counts it, then C_SetPIN(old, new)."""
    from pkcs11.exceptions import PinIncorrect, PinLenRange, PKCS11Error

    with state.locked():
        _require_user(state, user)
        failures = state.failures(user)
        if state.is_locked(user):
            raise CliError(
                f"user {user} is locked after {failures} failed logins; an admin must reset "
                "its password (user change-password with CLOUDHSM_ROLE=admin)"
            )
        _require_logged_out(state, user)
        try:
            session = _login(token, user_pin=old)
        except (PinIncorrect, PinLenRange):
            failures += 1
            state.set_failures(user, failures)
            threshold = state.lockout_threshold
            if threshold > 0 and failures >= threshold:
                raise CliError(
                    f"incorrect password for user {user}; {user} is now locked after "
                    f"{failures} failed logins: an admin must reset its password"
                ) from None
            plural = "" if failures == 1 else "s"
            left = f", {threshold - failures} left before lockout" if threshold > 0 else ""
            raise CliError(
                f"incorrect password for user {user} ({failures} failed login{plural}{left})"
            ) from None
        except PKCS11Error as exc:
            raise _hsm_error(f"logging in as {user}", exc) from None
        state.set_failures(user, 0)
        try:
            session.set_pin(old, new)
        except PKCS11Error as exc:
            raise _hsm_error(f"changing {user}'s password", exc) from None
        finally:
            _close(session)


def _close(session: Session) -> None:
    from pkcs11.exceptions import PKCS11Error

    with suppress(PKCS11Error):  # the process ends next; SoftHSM2 drops the session with it
        session.close()


# ---- entry point ------------------------------------------------------------------------------


def run(args: Sequence[str], environ: Mapping[str, str]) -> Any:
    match list(args):
        case ["user", "list"]:
            return user_list(load_conf(environ))
        case ["user", "change-password", *rest]:
            return change_password(environ, rest)
        case _:
            raise CliError(USAGE)


def _secrets(args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Every string that may be a password, for scrubbing from messages."""
    found = [environ.get("CLOUDHSM_PIN", "").partition(":")[2]]
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
