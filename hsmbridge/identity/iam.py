"""IAM per account: users, groups, roles and their policies, read from authorization-details files.

Owns: `IamDirectory`, which serves one file per account, `DIR/ACCOUNT.json` (a 12-digit name; other
files are ignored), each in exactly the shape `aws iam get-account-authorization-details` prints:
`UserDetailList`, `GroupDetailList`, `RoleDetailList` and `Policies` (every list optional; fields
the output has that hsmbridge does not use, such as CreateDate or Tags, are ignored). Policy
documents may be JSON objects (what the AWS CLI prints) or URL-encoded JSON strings (what the API
returns). Of a managed policy only its default version counts (`IsDefaultVersion`, which must agree
with `DefaultVersionId`). A role may carry `MaxSessionDuration` (seconds, 3600-43200; not part of
that output, default 3600).

AWS managed policies (`arn:aws:iam::aws:policy/NAME`) are taken from the file's `Policies` when
listed there (an export lists those attached in the account). Two are built in for files written
by hand: `AdministratorAccess` and `AWSKeyManagementServicePowerUser` (their AWS documents). Any
other managed policy an entity attaches but the file does not list is an error naming it.

Files are re-read while the service runs: at most every `RELOAD_INTERVAL_S` (monotonic clock), a
public call stats the directory's files (mtime_ns, size, inode) and reloads the changed, new and
removed ones. A malformed file is refused at construction with a ConfigError naming the file and
the field; on reload the refusal is an ERROR log and the file's previous good version stays in
force. Every policy is parsed once per file change. `generation()` bumps whenever what is in force
changes, so callers can cache what they derive from it.

Also `write_demo_iam`, the file `hsmbridge init` writes for its demo administrator.
Must not import: anything above hsmbridge.identity (service, edges); policy parsing comes from
hsmbridge.policy.document.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from hsmbridge import nowait
from hsmbridge.errors import ConfigError
from hsmbridge.policy.document import (
    PolicyDocument,
    PolicyDocumentError,
    parse_identity_policy,
    parse_trust_policy,
)

log = logging.getLogger(__name__)

RELOAD_INTERVAL_S: Final = 1.0
DEFAULT_MAX_SESSION_DURATION: Final = 3600
_MAX_SESSION_RANGE: Final = (3600, 43200)

_ACCOUNT_FILE_RE: Final = re.compile(r"^(\d{12})\.json$")
_ACCOUNT_RE: Final = re.compile(r"^\d{12}$")
# arn:PARTITION:SERVICE::ACCOUNT:RESOURCE for the principal kinds IAM and STS know.
_IAM_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>aws(?:-[a-z]+)*):iam::(?P<account>\d{12}):"
    r"(?:(?P<kind>user|role|group)/(?P<rest>[\w+=,.@/-]{1,512})|(?P<root>root))$"
)
_STS_ARN_RE: Final = re.compile(
    r"^arn:aws(?:-[a-z]+)*:sts::(?P<account>\d{12}):"
    r"(?P<kind>assumed-role|federated-user)/(?P<rest>[\w+=,.@/-]{1,512})$"
)
_AWS_MANAGED_RE: Final = re.compile(r"^arn:aws(?:-[a-z]+)*:iam::aws:policy/(?P<name>.+)$")

# The AWS managed policies hsmbridge knows without an export listing them (AWS's documents).
_BUILTIN_AWS_MANAGED: Final[Mapping[str, Mapping[str, Any]]] = {
    "AdministratorAccess": {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    },
    "AWSKeyManagementServicePowerUser": {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "kms:CreateAlias",
                    "kms:CreateKey",
                    "kms:DeleteAlias",
                    "kms:Describe*",
                    "kms:GenerateRandom",
                    "kms:Get*",
                    "kms:List*",
                    "kms:TagResource",
                    "kms:UntagResource",
                    "iam:ListGroups",
                    "iam:ListRoles",
                    "iam:ListUsers",
                ],
                "Resource": "*",
            }
        ],
    },
}


@dataclass(frozen=True, slots=True)
class NamedPolicy:
    """An identity policy and where it comes from: a managed policy's ARN, or "inline policy NAME
    of user/NAME" (group/NAME, role/NAME)."""

    label: str
    document: PolicyDocument


@dataclass(frozen=True, slots=True)
class IamUser:
    """An IAM user; `policies` holds its inline and attached policies, then its groups'."""

    arn: str
    name: str
    user_id: str
    account_id: str
    policies: tuple[NamedPolicy, ...]


@dataclass(frozen=True, slots=True)
class IamRole:
    """An IAM role: who may assume it (`trust_policy`) and what its sessions may do."""

    arn: str
    name: str
    role_id: str
    account_id: str
    trust_policy: PolicyDocument
    max_session_duration: int
    policies: tuple[NamedPolicy, ...]


@dataclass(frozen=True, slots=True)
class _Account:
    """One parsed file."""

    account_id: str
    users: Mapping[str, IamUser]  # by ARN
    roles: Mapping[str, IamRole]  # by ARN (with its path)
    roles_by_name: Mapping[str, IamRole]  # what an assumed-role session ARN names


_Stamp = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino


@dataclass(frozen=True, slots=True)
class _State:
    """What is in force; replaced whole, never mutated, so readers need no lock."""

    accounts: Mapping[str, _Account] = field(default_factory=dict)
    stamps: Mapping[str, _Stamp] = field(default_factory=dict)  # file name -> stamp in force
    generation: int = 0


class IamDirectory:
    """The IAM users, groups, roles and policies of every account with a file in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = RELOAD_INTERVAL_S,
    ) -> None:
        self._directory = Path(directory)
        self._clock = clock
        self._interval = interval_s
        self._lock = threading.Lock()
        # Stamps of files refused on reload, so a bad file is logged once per change, not per call.
        self._refused: dict[str, _Stamp] = {}
        accounts: dict[str, _Account] = {}
        stamps: dict[str, _Stamp] = {}
        for name, (path, stamp) in self._scan().items():
            try:
                accounts[name[:12]] = _load_file(path)
            except FileNotFoundError:  # removed since the scan
                continue
            stamps[name] = stamp
        self._state = _State(accounts, stamps, 0)
        self._next_check = clock() + interval_s

    @property
    def directory(self) -> Path:
        return self._directory

    # --- public lookups -------------------------------------------------------------------------

    def user(self, arn: str) -> IamUser | None:
        match = _IAM_ARN_RE.match(arn)
        if match is None or match["kind"] != "user":
            return None
        account = self._current().accounts.get(match["account"])
        return None if account is None else account.users.get(arn)

    def role(self, arn: str) -> IamRole | None:
        """The role with this ARN, path included (arn:aws:iam::ACCOUNT:role/PATH/NAME)."""
        match = _IAM_ARN_RE.match(arn)
        if match is None or match["kind"] != "role":
            return None
        account = self._current().accounts.get(match["account"])
        return None if account is None else account.roles.get(arn)

    def principals(self, account_id: str) -> tuple[list[str], list[str]]:
        """(user ARNs, role ARNs) of `account_id`'s IAM file, each sorted; empty without one."""
        account = self._current().accounts.get(account_id)
        if account is None:
            return [], []
        return sorted(account.users), sorted(account.roles)

    def role_by_name(self, account_id: str, name: str) -> IamRole | None:
        """The role an assumed-role session ARN names (those carry the name, not the path)."""
        account = self._current().accounts.get(account_id)
        return None if account is None else account.roles_by_name.get(name)

    def identity_policies(
        self, principal_arn: str, role_arn: str | None = None
    ) -> tuple[NamedPolicy, ...]:
        """The identity-based policies that apply to a caller.

        With `role_arn` (an assumed-role session), the role's. Otherwise by `principal_arn`: a
        user's own, a role's (a role ARN used directly acts as the role), an assumed-role session
        ARN's role's; an account root, an unknown principal or an account without a file has none.
        """
        if role_arn is not None:
            role = self.role(role_arn)
            return () if role is None else role.policies
        iam = _IAM_ARN_RE.match(principal_arn)
        if iam is not None:
            if iam["kind"] == "user":
                user = self.user(principal_arn)
                return () if user is None else user.policies
            if iam["kind"] == "role":
                role = self.role(principal_arn)
                return () if role is None else role.policies
            return ()
        sts = _STS_ARN_RE.match(principal_arn)
        if sts is not None and sts["kind"] == "assumed-role":
            role = self.role_by_name(sts["account"], sts["rest"].split("/", 1)[0])
            return () if role is None else role.policies
        return ()

    def principal_exists(self, arn: str) -> bool:
        """Whether a key-policy principal names someone who exists.

        "*", account roots and bare account ids always exist. A user or role ARN exists when its
        account's file lists it, and so does an assumed-role session ARN whose role is listed; for
        an account without a file hsmbridge cannot know, so they exist (KMS would ask IAM).
        """
        if arn == "*" or _ACCOUNT_RE.match(arn):
            return True
        iam = _IAM_ARN_RE.match(arn)
        if iam is not None and (iam["root"] or iam["kind"] == "group"):
            return bool(iam["root"])  # a group is never a principal
        match = iam or _STS_ARN_RE.match(arn)
        if match is None:
            return False
        account = self._current().accounts.get(match["account"])
        if account is None or match["kind"] == "federated-user":
            return True  # IAM would know; hsmbridge cannot
        listed = {"user": account.users, "role": account.roles}.get(match["kind"])
        if listed is not None:
            return arn in listed
        return match["rest"].split("/", 1)[0] in account.roles_by_name  # assumed-role/NAME/SESSION

    def knows_account(self, account_id: str) -> bool:
        return account_id in self._current().accounts

    def generation(self) -> int:
        return self._current().generation

    # --- reloading ------------------------------------------------------------------------------

    def _current(self) -> _State:
        if self._clock() < self._next_check:
            return self._state
        nowait.refuse("re-reading the IAM directory")
        with self._lock:
            now = self._clock()
            if now >= self._next_check:  # else another thread just refreshed
                self._refresh()
                self._next_check = now + self._interval
            return self._state

    def _scan(self) -> dict[str, tuple[Path, _Stamp]]:
        """{file name: (path, stamp)} of the account files in the directory (none if it is
        missing)."""
        found: dict[str, tuple[Path, _Stamp]] = {}
        try:
            entries = list(os.scandir(self._directory))
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise ConfigError(f"IAM directory {self._directory}: {exc.strerror}") from None
        for entry in entries:
            if _ACCOUNT_FILE_RE.match(entry.name) is None:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # removed since the listing
                continue
            found[entry.name] = (Path(entry.path), (st.st_mtime_ns, st.st_size, st.st_ino))
        return found

    def _refresh(self) -> None:
        """Apply changed, new and removed files (called with the lock held)."""
        old = self._state
        try:
            found = self._scan()
        except ConfigError as exc:
            log.error("IAM files not re-read: %s", exc)
            return
        accounts = dict(old.accounts)
        stamps = dict(old.stamps)
        changed = False
        for name in old.stamps.keys() - found.keys():
            log.info("IAM file %s removed; account %s has no IAM file now", name, name[:12])
            del accounts[name[:12]], stamps[name]
            changed = True
        for name in self._refused.keys() - found.keys():
            del self._refused[name]
        for name, (path, stamp) in found.items():
            if stamps.get(name) == stamp or self._refused.get(name) == stamp:
                continue
            try:
                account = _load_file(path)
            except ConfigError as exc:
                self._refused[name] = stamp
                kept = "its previous version stays in force" if name in stamps else "not loaded"
                log.error("IAM file refused (%s): %s", kept, exc)
                continue
            except FileNotFoundError:  # removed since the scan; the next scan sees it
                continue
            self._refused.pop(name, None)
            accounts[account.account_id] = account
            stamps[name] = stamp
            changed = True
            log.info("IAM file %s loaded", path)
        if changed:
            self._state = _State(accounts, stamps, old.generation + 1)


# --- parsing one file ---------------------------------------------------------------------------


class _FieldError(Exception):
    """A malformed field: `where` is its path in the document ("RoleDetailList[0].Arn")."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


def _load_file(path: Path) -> _Account:
    """Parse one ACCOUNT.json; ConfigError names the file and the field."""
    account_id = path.name[:12]
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    try:
        return _Parser(account_id).account(raw)
    except _FieldError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _list(raw: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(f"{where}{key}", "must be a list")
    return value


def _object(raw: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise _FieldError(where, "must be an object")
    return raw


def _str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise _FieldError(f"{where}.{key}", "must be a non-empty string")
    return value


class _Parser:
    """Parses one account's authorization details; policies are parsed once and shared."""

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.managed: dict[str, NamedPolicy] = {}

    def account(self, raw: Any) -> _Account:
        doc = _object(raw, "(document)")
        for i, item in enumerate(_list(doc, "Policies", "")):
            self._managed_policy(item, f"Policies[{i}]")
        groups: dict[str, tuple[NamedPolicy, ...]] = {}
        for i, item in enumerate(_list(doc, "GroupDetailList", "")):
            name, policies = self._group(item, f"GroupDetailList[{i}]")
            if name in groups:
                raise _FieldError(
                    f"GroupDetailList[{i}].GroupName", f"group {name!r} appears twice"
                )
            groups[name] = policies
        users: dict[str, IamUser] = {}
        for i, item in enumerate(_list(doc, "UserDetailList", "")):
            user = self._user(item, f"UserDetailList[{i}]", groups)
            if user.arn in users:
                raise _FieldError(f"UserDetailList[{i}].Arn", f"user {user.arn} appears twice")
            users[user.arn] = user
        roles: dict[str, IamRole] = {}
        by_name: dict[str, IamRole] = {}
        for i, item in enumerate(_list(doc, "RoleDetailList", "")):
            role = self._role(item, f"RoleDetailList[{i}]")
            if role.arn in roles or role.name in by_name:
                raise _FieldError(
                    f"RoleDetailList[{i}].RoleName", f"role {role.name} appears twice"
                )
            roles[role.arn] = role
            by_name[role.name] = role
        return _Account(self.account_id, users, roles, by_name)

    # --- policies ---

    def _document(self, raw: Any, where: str, *, trust: bool = False) -> PolicyDocument:
        if not isinstance(raw, str | dict):
            raise _FieldError(where, "must be a policy document (a JSON object or a string)")
        try:
            return parse_trust_policy(raw) if trust else parse_identity_policy(raw)
        except PolicyDocumentError as exc:
            raise _FieldError(where, str(exc)) from None

    def _managed_policy(self, raw: Any, where: str) -> None:
        item = _object(raw, where)
        arn = _str(item, "Arn", where)
        _str(item, "PolicyName", where)
        if arn in self.managed:
            raise _FieldError(f"{where}.Arn", f"policy {arn} appears twice")
        versions = _list(item, "PolicyVersionList", f"{where}.")
        default_id = item.get("DefaultVersionId")
        if default_id is not None and not isinstance(default_id, str):
            raise _FieldError(f"{where}.DefaultVersionId", "must be a string")
        chosen: tuple[int, Mapping[str, Any]] | None = None
        for j, version_raw in enumerate(versions):
            here = f"{where}.PolicyVersionList[{j}]"
            version = _object(version_raw, here)
            is_default = version.get("IsDefaultVersion", False)
            if not isinstance(is_default, bool):
                raise _FieldError(f"{here}.IsDefaultVersion", "must be true or false")
            if not is_default:
                continue
            if chosen is not None:
                raise _FieldError(here, "a second version has IsDefaultVersion true")
            chosen = (j, version)
        if chosen is None:
            raise _FieldError(f"{where}.PolicyVersionList", "no version has IsDefaultVersion true")
        j, version = chosen
        here = f"{where}.PolicyVersionList[{j}]"
        if default_id is not None and version.get("VersionId", default_id) != default_id:
            raise _FieldError(
                f"{here}.VersionId",
                f"the default version is {version.get('VersionId')!r} but DefaultVersionId "
                f"is {default_id!r}",
            )
        if "Document" not in version:
            raise _FieldError(f"{here}.Document", "missing")
        self.managed[arn] = NamedPolicy(
            arn, self._document(version["Document"], f"{here}.Document")
        )

    def _attached(self, item: Mapping[str, Any], where: str) -> list[NamedPolicy]:
        out: list[NamedPolicy] = []
        for j, ref_raw in enumerate(_list(item, "AttachedManagedPolicies", f"{where}.")):
            here = f"{where}.AttachedManagedPolicies[{j}]"
            arn = _str(_object(ref_raw, here), "PolicyArn", here)
            out.append(self._resolve_managed(arn, f"{here}.PolicyArn"))
        return out

    def _resolve_managed(self, arn: str, where: str) -> NamedPolicy:
        known = self.managed.get(arn)
        if known is not None:
            return known
        aws = _AWS_MANAGED_RE.match(arn)
        if aws is not None and aws["name"] in _BUILTIN_AWS_MANAGED:
            builtin = NamedPolicy(
                arn, self._document(_BUILTIN_AWS_MANAGED[aws["name"]], f"{where} (built in)")
            )
            self.managed[arn] = builtin
            return builtin
        raise _FieldError(
            where,
            f"managed policy {arn} is not in Policies"
            + (
                " (of the AWS managed policies only AdministratorAccess and "
                "AWSKeyManagementServicePowerUser are built in)"
                if aws is not None
                else ""
            ),
        )

    def _inline(
        self, item: Mapping[str, Any], key: str, owner: str, where: str
    ) -> list[NamedPolicy]:
        out: list[NamedPolicy] = []
        names: set[str] = set()
        for j, raw in enumerate(_list(item, key, f"{where}.")):
            here = f"{where}.{key}[{j}]"
            policy = _object(raw, here)
            name = _str(policy, "PolicyName", here)
            if name in names:
                raise _FieldError(f"{here}.PolicyName", f"inline policy {name!r} appears twice")
            names.add(name)
            if "PolicyDocument" not in policy:
                raise _FieldError(f"{here}.PolicyDocument", "missing")
            document = self._document(policy["PolicyDocument"], f"{here}.PolicyDocument")
            out.append(NamedPolicy(f"inline policy {name} of {owner}", document))
        return out

    # --- entities ---

    def _arn(self, item: Mapping[str, Any], kind: str, name: str, where: str) -> str:
        arn = _str(item, "Arn", where)
        match = _IAM_ARN_RE.match(arn)
        if match is None or match["kind"] != kind or match["account"] != self.account_id:
            raise _FieldError(
                f"{where}.Arn", f"{arn!r} is not an IAM {kind} ARN in account {self.account_id}"
            )
        if match["rest"].rsplit("/", 1)[-1] != name:
            raise _FieldError(f"{where}.Arn", f"{arn!r} does not end with the name {name!r}")
        return arn

    def _group(self, raw: Any, where: str) -> tuple[str, tuple[NamedPolicy, ...]]:
        item = _object(raw, where)
        name = _str(item, "GroupName", where)
        self._arn(item, "group", name, where)
        owner = f"group/{name}"
        inline = self._inline(item, "GroupPolicyList", owner, where)
        return name, tuple(inline + self._attached(item, where))

    def _user(self, raw: Any, where: str, groups: Mapping[str, tuple[NamedPolicy, ...]]) -> IamUser:
        item = _object(raw, where)
        name = _str(item, "UserName", where)
        user_id = _str(item, "UserId", where)
        arn = self._arn(item, "user", name, where)
        policies = self._inline(item, "UserPolicyList", f"user/{name}", where)
        policies += self._attached(item, where)
        for j, group in enumerate(_list(item, "GroupList", f"{where}.")):
            if not isinstance(group, str) or group not in groups:
                raise _FieldError(
                    f"{where}.GroupList[{j}]", f"group {group!r} is not in GroupDetailList"
                )
            policies += groups[group]
        return IamUser(arn, name, user_id, self.account_id, _unique(policies))

    def _role(self, raw: Any, where: str) -> IamRole:
        item = _object(raw, where)
        name = _str(item, "RoleName", where)
        role_id = _str(item, "RoleId", where)
        arn = self._arn(item, "role", name, where)
        if "AssumeRolePolicyDocument" not in item:
            raise _FieldError(f"{where}.AssumeRolePolicyDocument", "missing")
        trust = self._document(
            item["AssumeRolePolicyDocument"], f"{where}.AssumeRolePolicyDocument", trust=True
        )
        duration = item.get("MaxSessionDuration", DEFAULT_MAX_SESSION_DURATION)
        low, high = _MAX_SESSION_RANGE
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int)
            or not low <= duration <= high
        ):
            raise _FieldError(
                f"{where}.MaxSessionDuration", f"must be an integer {low}-{high}, got {duration!r}"
            )
        policies = self._inline(item, "RolePolicyList", f"role/{name}", where)
        policies += self._attached(item, where)
        return IamRole(arn, name, role_id, self.account_id, trust, duration, _unique(policies))


def _unique(policies: list[NamedPolicy]) -> tuple[NamedPolicy, ...]:
    """Each policy once (a managed policy attached to a user and to its group counts once)."""
    seen: set[str] = set()
    out: list[NamedPolicy] = []
    for policy in policies:
        if policy.label not in seen:
            seen.add(policy.label)
            out.append(policy)
    return tuple(out)


# --- the demo file ------------------------------------------------------------------------------

_ID_ALPHABET: Final = string.ascii_uppercase + string.digits


def new_user_id() -> str:
    """An IAM user's unique id as AWS makes them: AIDA and 17 uppercase letters and digits."""
    return "AIDA" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(17))


def write_demo_iam(path: Path, account_id: str, admin_arn: str) -> None:
    """Write `path` (ACCOUNT.json; mode 0600; its directory is created 0700 if missing) with one
    user, `admin_arn`, whose inline policy "AllowEverything" allows every action on every
    resource. Refuses to overwrite an existing file (FileExistsError)."""
    match = _IAM_ARN_RE.match(admin_arn)
    if match is None or match["kind"] != "user" or match["account"] != account_id:
        raise ValueError(f"{admin_arn!r} is not an IAM user ARN in account {account_id}")
    *path_parts, name = match["rest"].split("/")
    user_path = "/" + "".join(f"{part}/" for part in path_parts)
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    document = {
        "UserDetailList": [
            {
                "Path": user_path,
                "UserName": name,
                "UserId": new_user_id(),
                "Arn": admin_arn,
                "CreateDate": created,
                "UserPolicyList": [
                    {
                        "PolicyName": "AllowEverything",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                        },
                    }
                ],
                "GroupList": [],
                "AttachedManagedPolicies": [],
                "Tags": [],
            }
        ],
        "GroupDetailList": [],
        "RoleDetailList": [],
        "Policies": [],
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(document, indent=4) + "\n")
