"""Load and validate hsmbridge's TOML configuration into typed, immutable settings.

Owns: `Settings` (service settings, from `hsmbridge.toml`), `HsmProfile` (one HSM vendor's
facts and quirks, from a built-in profile shipped as package data in `hsmbridge/profiles/` or a
profile file) and the grammar of the metadata URL (`[metadata] url`; which engine opens it is
`hsmbridge.metadata.factory`'s business). Relative paths are resolved against the directory of the
file that names them; a relative SQLite path in the metadata URL against the data directory. The
environment variable `HSMBRIDGE_METADATA_URL`, when set, overrides the file's metadata URL. A
PostgreSQL URL may carry a password: it is masked (`mask_url`) in every message and repr. No
module-level singletons: callers load and pass these explicitly.
Must not import anything from hsmbridge but `errors`.
"""

from __future__ import annotations

import enum
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

from hsmbridge.errors import ConfigError

_ACCOUNT_RE = re.compile(r"^\d{12}$")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
SQLITE_SCHEME: Final = "sqlite"
POSTGRESQL_SCHEME: Final = "postgresql"
# The engines `hsmbridge.metadata.factory` can open; a URL naming any other is refused at load.
METADATA_SCHEMES: Final = (SQLITE_SCHEME, POSTGRESQL_SCHEME)
METADATA_URL_ENV: Final = "HSMBRIDGE_METADATA_URL"
_MASK: Final = "***"


class LoginFormat(enum.StrEnum):
    PASSWORD = "password"  # noqa: S105 - a format name, not a secret; SoftHSM2: the kmsuser password is the token's user PIN
    USER_COLON_PASSWORD = "user:password"  # noqa: S105 - CloudHSM SDK 5: "kmsuser:<password>"


class PasswordRotation(enum.StrEnum):
    """How the crypto user's password is changed when a store connects (KMS does it at every
    connect, to a value only it knows)."""

    NONE = "none"  # never changed by hsmbridge
    COMMAND = "command"  # the vendor's user-management CLI (CloudHSM: cloudhsm-cli)


class IvPolicy(enum.StrEnum):
    CALLER = "caller"  # the caller draws a random 12-byte IV (SoftHSM2)
    HSM_ZERO_BUFFER = "hsm_zero_buffer"  # a zeroed mutable buffer the HSM overwrites (CloudHSM)


@dataclass(frozen=True)
class HsmProfile:
    """One kind of HSM: where its PKCS#11 module is, how to log in, and its quirks."""

    name: str
    module_path: str
    login_format: LoginFormat
    crypto_user: str
    iv_policy: IvPolicy
    # python-pkcs11 exception class names that mean "the HSM is busy, retry" on this vendor.
    busy_errors: tuple[str, ...]
    # The vendor can leave a nameless, empty key object behind when killed mid-generation.
    incomplete_key_objects: bool
    serialize_calls: bool
    max_sessions: int
    template_omit: tuple[str, ...]
    decrypt_auth_failure_errors: tuple[str, ...]
    # Failed logins in a row after which the HSM locks the crypto user; 0: it never does.
    # hsmbridge stops one attempt short of it (service/login_budget.py).
    login_lockout_threshold: int = 0
    # The module can miss objects other processes created on the token (SoftHSM2: a process's
    # own writes absorb their change counter), so a key not found is looked for again after
    # re-initialising the library (backend/sessions.py `Library.refresh_after`).
    stale_cross_process_view: bool = False
    # The module answers from this process in microseconds (a library, not a network HSM), so a
    # cryptographic request may call it on the server's event loop when its lock is free
    # (`hsmbridge.nowait`); never for an HSM across a network, whose calls can stall.
    inline_calls: bool = False
    password_rotation: PasswordRotation = PasswordRotation.NONE
    # COMMAND: argv of the command that changes `{user}`'s password. It logs in as that user
    # with CLOUDHSM_ROLE=crypto-user and CLOUDHSM_PIN=user:old-password in its environment and
    # reads the new password twice (new, confirmation) from standard input; nothing secret is
    # put on its command line, which other local users can read.
    password_change_command: tuple[str, ...] = ()
    token_label: str | None = None  # None: first slot with a token present (CloudHSM)

    def login_pin(self, password: str) -> str:
        if self.login_format is LoginFormat.USER_COLON_PASSWORD:
            return f"{self.crypto_user}:{password}"
        return password


@dataclass(frozen=True)
class InventorySettings:
    provider: str  # "static" | "cloudhsm"
    path: Path | None = None  # static: a describe-clusters JSON document
    region: str | None = None  # cloudhsm: region of the cloudhsmv2 API
    endpoint_url: str | None = None  # cloudhsm: override (tests point this at moto_server)
    # static: how long an HSM that CreateHsm/DeleteHsm (the CloudHSM v2 API hsmbridge serves)
    # added or removed stays CREATE_IN_PROGRESS / DELETE_IN_PROGRESS, in seconds
    hsm_transition_delay_s: float = 10.0


@dataclass(frozen=True)
class ClusterBinding:
    """How to reach the PKCS#11 token behind one cluster."""

    cluster_id: str
    profile: HsmProfile


@dataclass(frozen=True)
class QuotaSettings:
    """`[quotas]`: KMS's request quotas for cryptographic operations, enforced only when enabled.

    Rates are for the whole endpoint; each server process enforces its share (see
    `hsmbridge.service.quotas`)."""

    enabled: bool = False
    # KMS's "Cryptographic operations (symmetric) request rate" per account (5,500/s in many
    # Regions).
    cryptographic_requests_per_s: float = 5500.0
    # KMS's request quota of one AWS CloudHSM key store, shared by all its keys (not adjustable).
    custom_key_store_requests_per_s: float = 1800.0


@dataclass(frozen=True)
class AuditSettings:
    """`[audit]`: bounds that keep hostile volume from filling the disk through the audit trail."""

    max_bytes: int = 100 << 20  # audit.jsonl is rotated once it is larger than this
    backups: int = 5  # rotated files kept: audit.jsonl.1 (newest) to audit.jsonl.N (oldest)
    max_entry_bytes: int = 16 << 10  # one line at most; a larger event loses its parameters
    # Events of requests refused before authentication, per process; the rest are counted.
    unauthenticated_per_s: float = 20.0


@dataclass(frozen=True)
class Settings:
    config_path: Path
    region: str
    account_id: str
    partition: str
    data_dir: Path
    # Normalised: a SQLite path in it is absolute. WARNING: a PostgreSQL URL may hold a password;
    # kept out of repr, and shown only through mask_url().
    metadata_url: str = field(repr=False)
    metadata_db: Path | None  # the SQLite file when the engine is SQLite, else None
    master_key_file: Path
    credentials_file: Path
    iam_dir: Path  # iam/ACCOUNT.json files in `aws iam get-account-authorization-details` shape
    audit_log: Path
    listen_host: str
    listen_port: int
    max_request_bytes: int
    request_timeout_s: float
    inventory: InventorySettings
    clusters: dict[str, ClusterBinding]
    hsm_env: dict[str, str] = field(default_factory=dict)
    custom_key_store_limit: int = 10
    # Server processes; None: not set, `hsmbridge serve` picks one per CPU (capped).
    workers: int | None = None
    # The credentials-file section (profile) whose principal CLI commands act as.
    cli_profile: str = "default"
    # HTTPS: the server's certificate chain and private key (PEM), both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A file holding the bearer token GET /health and /metrics require; None: they are open.
    ops_token_file: Path | None = None
    # Open connections one client address may hold; 0: no cap (behind a proxy or load balancer).
    max_connections_per_client: int = 256
    # Cryptographic requests on a store whose profile allows it run on the event loop when
    # nothing would make them wait (`hsmbridge.nowait`); False: always on a worker thread.
    inline_hsm_calls: bool = True
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    # Where the master key comes from instead of `master_key_file`: a command printing it
    # (base64), e.g. a secrets manager's CLI; the environment variable HSMBRIDGE_MASTER_KEY
    # (base64) overrides both (hsmbridge.keystore.master_key).
    master_key_command: tuple[str, ...] = ()

    def binding(self, cluster_id: str) -> ClusterBinding | None:
        return self.clusters.get(cluster_id)

    def apply_hsm_env(self) -> None:
        """Export HSM library settings (e.g. SOFTHSM2_CONF) before any PKCS#11 module loads."""
        for name, value in self.hsm_env.items():
            os.environ[name] = value


# --- loading -------------------------------------------------------------------------------------


def _read_toml(path: Traversable) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _get(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing required setting '{key}'")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _enum(enum_cls: type[enum.StrEnum], raw: str, where: str, key: str) -> Any:
    try:
        return enum_cls(raw)
    except ValueError:
        allowed = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{where}: '{key}' must be one of {allowed}, got {raw!r}") from None


def _profiles_dir() -> Traversable:
    # Package data, not a source-tree path: an installed wheel carries the profiles.
    return resources.files("hsmbridge") / "profiles"


def builtin_profile_names() -> list[str]:
    """The profiles shipped with hsmbridge, by the name `[[clusters]] profile` gives them."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _profiles_dir().iterdir()
        if entry.name.endswith(".toml")
    )


def builtin_profile(name: str) -> Traversable:
    """The built-in profile `name` (e.g. "softhsm2"), read from the installed package."""
    path = _profiles_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"HSM profile '{name}' is not a built-in profile "
            f"({', '.join(builtin_profile_names())}); give a path to a .toml file for another"
        )
    return path


def resolve_profile_path(name_or_path: str, base: Path) -> Traversable:
    """A path (anything with a '/' or ending in .toml, relative to `base`) or a built-in name."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or "/" in name_or_path:
        return candidate if candidate.is_absolute() else (base / candidate)
    return builtin_profile(name_or_path)


def load_profile(path: Traversable, token_label: str | None = None) -> HsmProfile:
    raw = _read_toml(path)
    where = str(path)
    max_sessions = _get(raw, "max_sessions", int, where, 4)
    if max_sessions < 1:
        raise ConfigError(f"{where}: 'max_sessions' must be at least 1")
    lockout = _get(raw, "login_lockout_threshold", int, where, 0)
    if lockout < 0 or lockout == 1:
        # 1 would leave no attempt that cannot lock the user: not even a first login.
        raise ConfigError(
            f"{where}: 'login_lockout_threshold' must be 0 (the HSM never locks) or at least 2,"
            f" got {lockout}"
        )
    rotation = _enum(
        PasswordRotation,
        _get(raw, "password_rotation", str, where, "none"),
        where,
        "password_rotation",
    )
    command = _command(raw, "password_change_command", where)
    if rotation is PasswordRotation.COMMAND and not command:
        raise ConfigError(
            f"{where}: 'password_rotation' is \"command\" but 'password_change_command' is empty"
        )
    return HsmProfile(
        name=_get(raw, "name", str, where),
        module_path=_get(raw, "module_path", str, where),
        login_format=_enum(
            LoginFormat, _get(raw, "login_format", str, where), where, "login_format"
        ),
        crypto_user=_get(raw, "crypto_user", str, where, "kmsuser"),
        iv_policy=_enum(IvPolicy, _get(raw, "iv_policy", str, where), where, "iv_policy"),
        busy_errors=tuple(_get(raw, "busy_errors", list, where, [])),
        incomplete_key_objects=_get(raw, "incomplete_key_objects", bool, where, False),
        stale_cross_process_view=_get(raw, "stale_cross_process_view", bool, where, False),
        serialize_calls=_get(raw, "serialize_calls", bool, where, True),
        max_sessions=max_sessions,
        template_omit=tuple(_get(raw, "template_omit", list, where, [])),
        decrypt_auth_failure_errors=tuple(
            _get(raw, "decrypt_auth_failure_errors", list, where, [])
        ),
        login_lockout_threshold=lockout,
        inline_calls=_get(raw, "inline_calls", bool, where, False),
        password_rotation=rotation,
        password_change_command=command,
        token_label=token_label,
    )


def _command(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    argv = _get(table, key, list, where, [])
    if not all(isinstance(arg, str) and arg for arg in argv):
        raise ConfigError(f"{where}: '{key}' must be a list of non-empty strings")
    return tuple(argv)


def _load_clusters(raw: list[Any], base: Path, where: str) -> dict[str, ClusterBinding]:
    clusters: dict[str, ClusterBinding] = {}
    for i, entry in enumerate(raw):
        here = f"{where}: [[clusters]] #{i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{here} must be a table")
        cluster_id = _get(entry, "cluster_id", str, here)
        profile = _get(entry, "profile", str, here)
        token_label = _get(entry, "token_label", str, here, None)
        # The vendor's library installed somewhere else, or a stand-in for it (the CloudHSM
        # stand-in over SoftHSM2 that CI runs the `cloudhsm` profile through).
        module_path = _get(entry, "module_path", str, here, None)
        try:
            loaded = load_profile(resolve_profile_path(profile, base), token_label)
        except ConfigError as exc:
            # The profile's own errors name only the profile file; say which setting led there.
            raise ConfigError(f"{here}: 'profile' {profile!r}: {exc}") from None
        if module_path is not None:
            loaded = replace(loaded, module_path=str(base / module_path))
        command = _command(entry, "password_change_command", here)
        if command:
            # A relative program path is relative to this file, like every other path here.
            program = command[0] if "/" not in command[0] else str(base / command[0])
            loaded = replace(loaded, password_change_command=(program, *command[1:]))
        clusters[cluster_id] = ClusterBinding(cluster_id, loaded)
    return clusters


def _load_inventory(raw: dict[str, Any], base: Path, where: str) -> InventorySettings:
    here = f"{where}: [inventory]"
    provider = _get(raw, "provider", str, here)
    delay = _get(raw, "hsm_transition_delay_s", float, here, 10.0)
    if not math.isfinite(delay) or delay < 0:
        raise ConfigError(
            f"{here}: 'hsm_transition_delay_s' must be a number of seconds >= 0, got {delay!r}"
        )
    if provider == "static":
        return InventorySettings(
            "static", path=base / _get(raw, "path", str, here), hsm_transition_delay_s=delay
        )
    if provider == "cloudhsm":
        return InventorySettings(
            "cloudhsm",
            region=_get(raw, "region", str, here, None),
            endpoint_url=_get(raw, "endpoint_url", str, here, None),
            hsm_transition_delay_s=delay,
        )
    raise ConfigError(f"{here}: 'provider' must be 'static' or 'cloudhsm', got {provider!r}")


def mask_url(url: str) -> str:
    """`url` with any password (user:PASSWORD@host, or a `password=` query parameter) replaced
    by `***`: the only form of a metadata URL that may reach a log line, a message or a repr."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable as a URL: show nothing of it that could be a secret
        return f"{url.partition('://')[0]}://{_MASK}"
    userinfo, _at, hostport = parts.netloc.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    pieces = parts.query.split("&") if parts.query else []
    query = [
        f"{p.partition('=')[0]}={_MASK}" if p.partition("=")[0].lower() == "password" else p
        for p in pieces
    ]
    if not colon and query == pieces:
        return url  # nothing secret in it; unchanged (urlunsplit would rewrite sqlite:////)
    netloc = f"{user}:{_MASK}@{hostport}" if colon else parts.netloc
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    return (
        masked
        + (f"?{'&'.join(query)}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def parse_metadata_url(url: str, base: Path | None = None) -> tuple[str, Path | None]:
    """(scheme, database file) of a metadata URL; the file is None for an engine without one.

    SQLite follows the SQLAlchemy form: `sqlite:///relative/path` (resolved against `base`, else
    the working directory) or `sqlite:////absolute/path`. PostgreSQL takes a libpq URL,
    `postgresql://user[:password]@host[:port]/database[?param=value...]`, checked for shape only
    here (libpq is the judge of its parameters, when the store connects). ConfigError names the
    URL (masked), not where it came from: callers add that.
    """
    shown = mask_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise ConfigError(f"{shown!r} is not a URL; expected e.g. sqlite:///metadata.sqlite3")
    if scheme not in METADATA_SCHEMES:
        raise ConfigError(
            f"{shown!r} names an unsupported metadata engine {scheme!r}; supported schemes: "
            f"{', '.join(METADATA_SCHEMES)} (e.g. sqlite:///metadata.sqlite3)"
        )
    if scheme == POSTGRESQL_SCHEME:
        _check_postgresql_url(url, shown)
        return scheme, None
    if not rest.startswith("/"):
        raise ConfigError(
            f"{shown!r}: a SQLite URL has no host; use sqlite:///relative/path or "
            "sqlite:////absolute/path"
        )
    if "?" in rest or "#" in rest:
        raise ConfigError(f"{shown!r}: a SQLite URL takes no query or fragment")
    raw = rest[1:]
    if not raw:
        raise ConfigError(f"{shown!r}: a SQLite URL needs a database file path")
    file = Path(raw)
    if not file.is_absolute() and base is not None:
        file = base / file
    return scheme, file


def _check_postgresql_url(url: str, shown: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{shown!r}: not a valid PostgreSQL URL ({exc})") from None
    if parts.fragment:
        raise ConfigError(f"{shown!r}: a PostgreSQL URL takes no fragment")
    if not parts.path.strip("/"):
        raise ConfigError(
            f"{shown!r}: a PostgreSQL URL must name its database, e.g. "
            "postgresql://hsmbridge@db.internal:5432/hsmbridge"
        )


def sqlite_url(path: Path) -> str:
    """The metadata URL of a SQLite database file (absolute paths give the four-slash form)."""
    return f"{SQLITE_SCHEME}:///{path}"


def _metadata(
    raw: dict[str, Any],
    paths: dict[str, Any],
    data_dir: Path,
    where: str,
    environ: Mapping[str, str],
) -> tuple[str, Path | None]:
    """(normalised URL, SQLite file or None) from HSMBRIDGE_METADATA_URL, else `[metadata] url`,
    else `[paths] metadata_db`."""
    table = _get(raw, "metadata", dict, where, None)
    override = environ.get(METADATA_URL_ENV)
    if override:  # set and not empty: the deployment's choice wins over the file's
        url, here = override, f"environment variable {METADATA_URL_ENV}:"
    elif table is None:
        db = data_dir / _get(paths, "metadata_db", str, where, "metadata.sqlite3")
        return sqlite_url(db), db
    else:
        here = f"{where}: [metadata]"
        if "metadata_db" in paths:
            raise ConfigError(
                f"{here}: 'url' and [paths] 'metadata_db' both name the metadata database; keep one"
            )
        url = _get(table, "url", str, here)
        here = f"{here}: 'url'"
    try:
        _scheme, db = parse_metadata_url(url, data_dir)
    except ConfigError as exc:
        raise ConfigError(f"{here} {exc}") from None
    return (url if db is None else sqlite_url(db)), db


def load_settings(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read `hsmbridge.toml`; every problem is a ConfigError naming the file and the setting.

    `environ` (default: the process environment) supplies HSMBRIDGE_METADATA_URL.
    """
    path = Path(path).resolve()
    raw = _read_toml(path)
    base = path.parent
    where = str(path)
    service = _get(raw, "service", dict, where)
    here = f"{where}: [service]"
    region = _get(service, "region", str, here)
    account = _get(service, "account_id", str, here)
    if not _REGION_RE.match(region):
        raise ConfigError(f"{here}: 'region' {region!r} is not an AWS region name")
    if not _ACCOUNT_RE.match(account):
        raise ConfigError(f"{here}: 'account_id' must be 12 digits, got {account!r}")
    paths = _get(raw, "paths", dict, where, {})
    data_dir = base / _get(paths, "data_dir", str, f"{where}: [paths]", ".")
    hsm = _get(raw, "hsm", dict, where, {})
    hsm_env = {
        k: str(base / v) if k.endswith("_CONF") else str(v)
        for k, v in _get(hsm, "env", dict, f"{where}: [hsm]", {}).items()
    }
    port = _get(service, "listen_port", int, here, 8080)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{here}: 'listen_port' must be 0-65535, got {port}")
    metadata_url, metadata_db = _metadata(
        raw, paths, data_dir, where, os.environ if environ is None else environ
    )
    tls_cert, tls_key = _tls(service, base, here)
    return Settings(
        config_path=path,
        region=region,
        account_id=account,
        partition=_get(service, "partition", str, here, "aws"),
        data_dir=data_dir,
        metadata_url=metadata_url,
        metadata_db=metadata_db,
        master_key_file=data_dir / _get(paths, "master_key", str, where, "master.key"),
        master_key_command=_command(
            _get(raw, "secrets", dict, where, {}), "master_key_command", f"{where}: [secrets]"
        ),
        credentials_file=data_dir / _get(paths, "credentials", str, where, "credentials"),
        iam_dir=base / _get(paths, "iam", str, where, "iam"),
        audit_log=data_dir / _get(paths, "audit_log", str, where, "audit.jsonl"),
        listen_host=_get(service, "listen_host", str, here, "127.0.0.1"),
        listen_port=port,
        max_request_bytes=_get(service, "max_request_bytes", int, here, 1 << 20),
        request_timeout_s=_get(service, "request_timeout_s", float, here, 30.0),
        inventory=_load_inventory(_get(raw, "inventory", dict, where), base, where),
        clusters=_load_clusters(_get(raw, "clusters", list, where, []), base, where),
        hsm_env=hsm_env,
        custom_key_store_limit=_get(service, "custom_key_store_limit", int, here, 10),
        workers=_workers(service, here),
        cli_profile=_get(
            _get(raw, "cli", dict, where, {}), "profile", str, f"{where}: [cli]", "default"
        ),
        tls_cert=tls_cert,
        tls_key=tls_key,
        ops_token_file=_optional_path(service, "ops_token_file", base, here),
        max_connections_per_client=_connections_per_client(service, here),
        inline_hsm_calls=_get(service, "inline_hsm_calls", bool, here, True),
        quotas=_quotas(_get(raw, "quotas", dict, where, {}), f"{where}: [quotas]"),
        audit=_audit(_get(raw, "audit", dict, where, {}), f"{where}: [audit]"),
    )


def _tls(service: dict[str, Any], base: Path, here: str) -> tuple[Path | None, Path | None]:
    """`tls_cert` and `tls_key` (relative to the configuration file): both or neither."""
    cert: str | None = _get(service, "tls_cert", str, here, None)
    key: str | None = _get(service, "tls_key", str, here, None)
    if (cert is None) != (key is None):
        missing, given = ("tls_key", "tls_cert") if key is None else ("tls_cert", "tls_key")
        raise ConfigError(
            f"{here}: '{missing}' is required when '{given}' is set (both or neither)"
        )
    if cert is None or key is None:
        return None, None
    return base / cert, base / key


def _connections_per_client(service: dict[str, Any], here: str) -> int:
    cap: int = _get(service, "max_connections_per_client", int, here, 256)
    if not 0 <= cap <= 1_000_000:
        raise ConfigError(f"{here}: 'max_connections_per_client' must be 0-1000000, got {cap}")
    return cap


def _optional_path(table: dict[str, Any], key: str, base: Path, here: str) -> Path | None:
    """A file named relative to the configuration file, or None when the key is absent."""
    value: str | None = _get(table, key, str, here, None)
    if value is not None and not value.strip():
        raise ConfigError(f"{here}: '{key}' must name a file, got an empty string")
    return None if value is None else base / value


def _workers(service: dict[str, Any], here: str) -> int | None:
    workers: int | None = _get(service, "workers", int, here, None)
    if workers is not None and not 1 <= workers <= 64:
        raise ConfigError(f"{here}: 'workers' must be 1-64, got {workers}")
    return workers


def _quotas(table: dict[str, Any], here: str) -> QuotaSettings:
    """`[quotas]` (optional): off unless `enabled`; rates are requests per second, > 0."""
    defaults = QuotaSettings()
    return QuotaSettings(
        enabled=_get(table, "enabled", bool, here, defaults.enabled),
        cryptographic_requests_per_s=_rate(
            table, "cryptographic_requests_per_s", here, defaults.cryptographic_requests_per_s
        ),
        custom_key_store_requests_per_s=_rate(
            table, "custom_key_store_requests_per_s", here, defaults.custom_key_store_requests_per_s
        ),
    )


def _rate(table: dict[str, Any], key: str, here: str, default: float) -> float:
    rate: float = _get(table, key, float, here, default)
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(
            f"{here}: '{key}' must be a number of requests per second > 0, got {rate!r}"
        )
    return rate


_AUDIT_KEYS: Final = ("max_bytes", "backups", "max_entry_bytes", "unauthenticated_per_s")


def _audit(table: dict[str, Any], here: str) -> AuditSettings:
    """`[audit]` (optional). Unknown keys are refused: a misspelt bound would silently fall back
    to its default, which is not what its author meant to protect."""
    unknown = sorted(set(table) - set(_AUDIT_KEYS))
    if unknown:
        raise ConfigError(
            f"{here}: unknown setting(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(_AUDIT_KEYS)}"
        )
    defaults = AuditSettings()
    max_bytes: int = _get(table, "max_bytes", int, here, defaults.max_bytes)
    if max_bytes < 1 << 20:
        raise ConfigError(f"{here}: 'max_bytes' must be at least 1048576 (1 MiB), got {max_bytes}")
    backups: int = _get(table, "backups", int, here, defaults.backups)
    if not 1 <= backups <= 100:
        raise ConfigError(f"{here}: 'backups' must be 1-100, got {backups}")
    entry: int = _get(table, "max_entry_bytes", int, here, defaults.max_entry_bytes)
    if not 1 << 10 <= entry <= 1 << 20:
        raise ConfigError(
            f"{here}: 'max_entry_bytes' must be 1024-1048576 (1 KiB to 1 MiB), got {entry}"
        )
    rate: float = _get(table, "unauthenticated_per_s", float, here, defaults.unauthenticated_per_s)
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(
            f"{here}: 'unauthenticated_per_s' must be a number of events per second > 0, "
            f"got {rate!r}"
        )
    return AuditSettings(max_bytes, backups, entry, rate)
