"""Configuration loading: every problem is a ConfigError naming the file and the setting.

Also: a malformed static inventory is a ConfigError when it is read (it is re-read at every
check), and CreateCustomKeyStore over it fails cleanly with nothing created. These run on a real
SQLite file and the fake HSM connector: nothing here reaches an HSM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hsmbridge
from hsmbridge import bootstrap
from hsmbridge.config import (
    METADATA_URL_ENV,
    IvPolicy,
    LoginFormat,
    builtin_profile,
    builtin_profile_names,
    load_profile,
    load_settings,
    mask_url,
)
from hsmbridge.errors import ConfigError, KMSInternalException
from hsmbridge.identity.iam import write_demo_iam
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.keystore.inventory import StaticInventory
from tests.callers import ADMIN, ADMIN_ARN
from tests.fakes import FakeConnector
from tests.harness import ACCOUNT

SOFTHSM_PROFILE = builtin_profile("softhsm2")
SERVICE = '[service]\nregion = "eu-west-2"\naccount_id = "111122223333"\n'
INVENTORY = '[inventory]\nprovider = "static"\npath = "clusters.json"\n'


def cluster_entry(profile: str = "softhsm2", cluster_id: str = "cluster-abcdefghijk") -> str:
    return f'[[clusters]]\ncluster_id = "{cluster_id}"\nprofile = "{profile}"\ntoken_label = "t"\n'


def write(tmp_path: Path, text: str, name: str = "hsmbridge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_config_resolves_relative_paths_and_profiles(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        SERVICE + 'listen_port = 0\n[paths]\ndata_dir = "data"\n' + INVENTORY
        + '[hsm.env]\nSOFTHSM2_CONF = "softhsm2.conf"\nOTHER = "plain"\n' + cluster_entry(),
    )  # fmt: skip
    s = load_settings(path)
    assert (s.region, s.account_id, s.partition, s.listen_port) == (
        "eu-west-2", "111122223333", "aws", 0,
    )  # fmt: skip
    assert s.data_dir == tmp_path / "data"
    assert s.metadata_db == tmp_path / "data" / "metadata.sqlite3"
    assert s.inventory.path == tmp_path / "clusters.json"
    assert s.hsm_env == {"SOFTHSM2_CONF": str(tmp_path / "softhsm2.conf"), "OTHER": "plain"}
    binding = s.binding("cluster-abcdefghijk")
    assert binding is not None
    assert binding.profile.login_format is LoginFormat.PASSWORD
    assert binding.profile.iv_policy is IvPolicy.CALLER
    assert binding.profile.token_label == "t"
    assert s.custom_key_store_limit == 10
    cloudhsm = load_profile(builtin_profile("cloudhsm"))
    assert cloudhsm.login_pin("pw12345") == "kmsuser:pw12345"
    assert cloudhsm.iv_policy is IvPolicy.HSM_ZERO_BUFFER


def test_a_cluster_may_name_its_own_module_path(tmp_path: Path) -> None:
    """The vendor's library installed elsewhere, or a stand-in for it; relative to the file."""
    entry = (
        '[[clusters]]\ncluster_id = "cluster-abcdefghijk"\nprofile = "cloudhsm"\n'
        'module_path = "lib/libcloudhsm-shim.so"\n'
        '[[clusters]]\ncluster_id = "cluster-bcdefghijkl"\nprofile = "cloudhsm"\n'
    )
    s = load_settings(write(tmp_path, SERVICE + INVENTORY + entry))
    moved, stock = s.binding("cluster-abcdefghijk"), s.binding("cluster-bcdefghijkl")
    assert moved is not None
    assert stock is not None
    assert moved.profile.module_path == str(tmp_path / "lib" / "libcloudhsm-shim.so")
    assert stock.profile.module_path == "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"
    assert moved.profile.token_label is None  # CloudHSM: the first slot with a token
    assert moved.profile.login_pin("pw12345") == "kmsuser:pw12345"  # the rest is the profile's


# (config text, words the ConfigError must contain besides the file's path)
BAD_CONFIGS = [
    ("[service\nregion=", ["not valid TOML"]),
    (INVENTORY, ["missing required setting 'service'"]),
    ('[service]\naccount_id = "111122223333"\n' + INVENTORY, ["[service]", "'region'"]),
    (SERVICE.replace("eu-west-2", "Europe") + INVENTORY, ["[service]", "'region'", "Europe"]),
    (SERVICE.replace('"111122223333"', '"1234"') + INVENTORY, ["'account_id'", "12 digits"]),
    (SERVICE.replace('"111122223333"', "111122223333") + INVENTORY, ["'account_id'", "str"]),
    (SERVICE + "listen_port = 70000\n" + INVENTORY, ["'listen_port'", "70000"]),
    (SERVICE + "listen_port = true\n" + INVENTORY, ["'listen_port'", "int"]),
    (SERVICE, ["missing required setting 'inventory'"]),
    (SERVICE + '[inventory]\nprovider = "ldap"\n', ["[inventory]", "'provider'", "ldap"]),
    (SERVICE + '[inventory]\nprovider = "static"\n', ["[inventory]", "'path'"]),
    (SERVICE + INVENTORY + "[[clusters]]\nprofile = 'x'\n", ["[[clusters]] #1", "cluster_id"]),
    ("clusters = [1]\n" + SERVICE + INVENTORY, ["[[clusters]] #1", "must be a table"]),
    (SERVICE + INVENTORY + cluster_entry("no-such-profile"), ["'profile'", "no-such-profile"]),
    (SERVICE + INVENTORY + cluster_entry("missing.toml"), ["'profile'", "missing.toml"]),
]  # fmt: skip


def _assert_refused(path: Path, words: list[str]) -> None:
    """Loading `path` fails with a ConfigError naming the file and every one of `words`."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("text", "words"), BAD_CONFIGS)
def test_bad_config_names_file_and_setting(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text)
    _assert_refused(path, words)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_settings(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(caught.value)


# (profile edits, words the error must contain besides the profile's path)
BAD_PROFILES = [
    (('login_format = "password"', 'login_format = "pin"'), ["'login_format'", "pin"]),
    (('iv_policy = "caller"', 'iv_policy = "random"'), ["'iv_policy'", "random"]),
    (("max_sessions = 4", "max_sessions = 0"), ["'max_sessions'"]),
    (("max_sessions = 4", 'max_sessions = "4"'), ["'max_sessions'", "int"]),
    (("serialize_calls = true", "serialize_calls = 1"), ["'serialize_calls'", "bool"]),
    (
        ("login_lockout_threshold = 5", "login_lockout_threshold = -1"),
        ["'login_lockout_threshold'", "-1"],
    ),
    # 1: even a first login could lock the user, so no login would ever be safe.
    (
        ("login_lockout_threshold = 5", "login_lockout_threshold = 1"),
        ["'login_lockout_threshold'", "at least 2"],
    ),
]


@pytest.mark.parametrize(("edit", "words"), BAD_PROFILES)
def test_bad_profile_names_profile_file_and_setting(
    tmp_path: Path, edit: tuple[str, str], words: list[str]
) -> None:
    original = SOFTHSM_PROFILE.read_text()
    assert edit[0] in original  # guards the test against the stock profile drifting
    profile = write(tmp_path, original.replace(*edit), "bad-profile.toml")
    config = write(tmp_path, SERVICE + INVENTORY + cluster_entry(str(profile)))
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    message = str(caught.value)
    assert str(profile) in message
    for word in words:
        assert word in message, message


def test_profile_without_module_path(tmp_path: Path) -> None:
    text = "\n".join(
        line for line in SOFTHSM_PROFILE.read_text().splitlines() if "module_path" not in line
    )
    profile = write(tmp_path, text, "no-module.toml")
    with pytest.raises(ConfigError, match="missing required setting 'module_path'") as caught:
        load_profile(profile)
    assert str(profile) in str(caught.value)


def test_profile_without_a_lockout_threshold_never_locks(tmp_path: Path) -> None:
    text = "\n".join(
        line
        for line in SOFTHSM_PROFILE.read_text().splitlines()
        if "login_lockout_threshold" not in line
    )
    assert load_profile(write(tmp_path, text, "no-lockout.toml")).login_lockout_threshold == 0
    assert load_profile(SOFTHSM_PROFILE).login_lockout_threshold == 5


# --- the static inventory ---------------------------------------------------------------------

MALFORMED_INVENTORIES = [
    ("{not json", "not valid JSON"),
    ("[]", "$: must be an object"),
    ('{"Clusters": {}}', "$.Clusters: must be an array"),
    ('{"Clusters": [{"State": "ACTIVE"}]}', "$.Clusters[0].ClusterId: missing required field"),
    (
        '{"Clusters": [{"ClusterId": "cluster-abcdefghijk", "State": "ACTIVE", "Hsms": [{}]}]}',
        "$.Clusters[0].Hsms[0].HsmId",
    ),
]


@pytest.mark.parametrize(("text", "words"), MALFORMED_INVENTORIES)
def test_malformed_inventory_is_a_config_error_when_read(
    tmp_path: Path, text: str, words: str
) -> None:
    path = write(tmp_path, text, "clusters.json")
    inventory = StaticInventory(path)  # constructing it reads nothing: the file is live
    with pytest.raises(ConfigError) as caught:
        inventory.describe("cluster-abcdefghijk")
    assert str(path) in str(caught.value)
    assert words in str(caught.value)


def test_missing_inventory_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        StaticInventory(tmp_path / "absent.json").describe("cluster-abcdefghijk")


def test_create_store_over_malformed_inventory_creates_nothing(tmp_path: Path) -> None:
    cluster_id = new_cluster_id()
    pki = make_demo_pki(cluster_id)
    config = write(tmp_path, SERVICE + INVENTORY + cluster_entry(cluster_id=cluster_id))
    inventory = tmp_path / "clusters.json"
    good = json.dumps(
        describe_clusters_document([DemoClusterSpec(cluster_id, pki.cluster_cert_pem)])
    )
    settings = load_settings(config)
    write_demo_iam(settings.iam_dir / f"{ACCOUNT}.json", ACCOUNT, ADMIN_ARN)
    service = bootstrap.open_service(
        settings, connector=FakeConnector({cluster_id: "kmsuser-pass"})
    )
    try:
        for bad in ("{not json", good.replace('"Hsms"', '"Hsmz"').replace('"State"', '"Sate"')):
            inventory.write_text(bad)
            # A KMS error (so HTTP clients get a clear message) that still names the file.
            with pytest.raises(KMSInternalException, match=r"clusters\.json"):
                service.keystores.create(ADMIN, "S", cluster_id, pki.ca_cert_pem, "kmsuser-pass")
            assert service.keystores.describe(ADMIN).items == ()
        inventory.write_text(good)  # fixed file: the same call now succeeds
        store_id = service.keystores.create(ADMIN, "S", cluster_id, pki.ca_cert_pem, "kmsuser-pass")
        assert [s.store_id for s in service.keystores.describe(ADMIN).items] == [store_id]
    finally:
        service.close()


# --- HSM profiles ship in the package ---------------------------------------------------------


def test_builtin_profiles_are_package_data() -> None:
    assert builtin_profile_names() == ["cloudhsm", "softhsm2"]
    package_dir = Path(hsmbridge.__file__).resolve().parent
    for name in builtin_profile_names():
        profile = builtin_profile(name)
        assert Path(str(profile)).resolve().parent == package_dir / "profiles"
        assert load_profile(profile).name == name


def test_unknown_profile_name_lists_the_builtin_ones(tmp_path: Path) -> None:
    path = write(tmp_path, SERVICE + INVENTORY + cluster_entry("thales"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    for word in (str(path), "[[clusters]] #1", "'profile'", "thales", "cloudhsm, softhsm2"):
        assert word in message, message


# --- the metadata store is chosen by configuration -------------------------------------------


def test_metadata_defaults_to_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, SERVICE + '[paths]\ndata_dir = "data"\n' + INVENTORY))
    assert s.metadata_db == tmp_path / "data" / "metadata.sqlite3"
    assert s.metadata_url == f"sqlite:///{tmp_path}/data/metadata.sqlite3"
    assert s.metadata_url.startswith("sqlite:////")  # absolute: the four-slash form


def test_paths_metadata_db_still_names_the_sqlite_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, SERVICE + '[paths]\nmetadata_db = "m/kms.db"\n' + INVENTORY))
    assert s.metadata_db == tmp_path / "m" / "kms.db"
    assert s.metadata_url == f"sqlite:///{tmp_path}/m/kms.db"


def test_metadata_url_relative_path_resolves_against_the_data_dir(tmp_path: Path) -> None:
    text = SERVICE + '[paths]\ndata_dir = "data"\n[metadata]\nurl = "sqlite:///db/kms.sqlite3"\n'
    s = load_settings(write(tmp_path, text + INVENTORY))
    assert s.metadata_db == tmp_path / "data" / "db" / "kms.sqlite3"
    assert s.metadata_url == f"sqlite:///{tmp_path}/data/db/kms.sqlite3"


def test_metadata_url_absolute_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "kms.sqlite3"
    text = SERVICE + f'[paths]\ndata_dir = "data"\n[metadata]\nurl = "sqlite:///{elsewhere}"\n'
    s = load_settings(write(tmp_path, text + INVENTORY))
    assert s.metadata_db == elsewhere
    assert s.metadata_url == f"sqlite:///{elsewhere}"


def test_postgresql_url_selects_no_file_and_is_kept_verbatim(tmp_path: Path) -> None:
    url = "postgresql://kms:s3cret-pw@db.internal:5432/kms?sslmode=require"
    s = load_settings(write(tmp_path, SERVICE + f'[metadata]\nurl = "{url}"\n' + INVENTORY))
    assert s.metadata_url == url
    assert s.metadata_db is None  # the secret-file checks skip a server's database
    assert "s3cret-pw" not in repr(s)


def test_environment_url_overrides_the_file(tmp_path: Path) -> None:
    text = SERVICE + '[paths]\ndata_dir = "data"\n[metadata]\nurl = "sqlite:///file.db"\n'
    path = write(tmp_path, text + INVENTORY)
    env = {METADATA_URL_ENV: "postgresql://kms@db.internal/kms"}
    s = load_settings(path, environ=env)
    assert (s.metadata_url, s.metadata_db) == ("postgresql://kms@db.internal/kms", None)
    s = load_settings(path, environ={METADATA_URL_ENV: "sqlite:///env.db"})
    assert s.metadata_db == tmp_path / "data" / "env.db"
    assert load_settings(path, environ={METADATA_URL_ENV: ""}).metadata_db == (
        tmp_path / "data" / "file.db"
    )  # empty: not set


def test_a_bad_environment_url_names_the_variable_and_masks_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, SERVICE + INVENTORY)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={METADATA_URL_ENV: "postgresql://kms:hunter2@db.internal"})
    message = str(caught.value)
    assert METADATA_URL_ENV in message
    assert "kms:***@db.internal" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://kms:pw@db:5432/kms", "postgresql://kms:***@db:5432/kms"),
        ("postgresql://kms@db/kms", "postgresql://kms@db/kms"),
        ("postgresql://db/kms?user=k&password=pw&sslmode=require",
         "postgresql://db/kms?user=k&password=***&sslmode=require"),
        ("postgresql://k:p%40ss@[::1]:5432/kms", "postgresql://k:***@[::1]:5432/kms"),
        ("sqlite:////var/lib/kms.sqlite3", "sqlite:////var/lib/kms.sqlite3"),
    ],
)  # fmt: skip
def test_mask_url_hides_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


# ([metadata] table, words the ConfigError must contain besides the file's path)
BAD_METADATA = [
    ('url = "mysql://kms@db.internal/kms"',
     ["[metadata]", "'url'", "'mysql'", "supported schemes: sqlite, postgresql"]),
    ('url = "postgresql://kms:hunter2@db.internal:5432"',
     ["[metadata]", "'url'", "must name its database", "kms:***@db.internal"]),
    ('url = "postgresql://kms:hunter2@db.internal:x/kms"',
     ["[metadata]", "'url'", "not a valid PostgreSQL URL"]),
    ('url = "metadata.sqlite3"', ["[metadata]", "'url'", "not a URL"]),
    ('url = "sqlite://db.internal/kms.sqlite3"', ["[metadata]", "'url'", "no host"]),
    ('url = "sqlite:///"', ["[metadata]", "'url'", "file path"]),
    ('url = "sqlite:///kms.sqlite3?mode=ro"', ["[metadata]", "'url'", "no query"]),
    ("url = 5", ["[metadata]", "'url' must be a str"]),
    ('engine = "sqlite"', ["[metadata]", "missing required setting 'url'"]),
]  # fmt: skip


@pytest.mark.parametrize(("table", "words"), BAD_METADATA)
def test_bad_metadata_url_names_file_and_setting(
    tmp_path: Path, table: str, words: list[str]
) -> None:
    path = write(tmp_path, SERVICE + INVENTORY + "[metadata]\n" + table + "\n")
    _assert_refused(path, words)


def test_metadata_url_and_paths_metadata_db_together_are_refused(tmp_path: Path) -> None:
    text = SERVICE + '[paths]\nmetadata_db = "a.db"\n[metadata]\nurl = "sqlite:///b.db"\n'
    path = write(tmp_path, text + INVENTORY)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    for word in (str(path), "[metadata]", "'url'", "[paths] 'metadata_db'"):
        assert word in message, message


def _credentials(tmp_path: Path) -> Path:
    path = tmp_path / "credentials"
    path.write_text(
        "[default]\naws_access_key_id = AKIADEFAULT0000000001\naws_secret_access_key = s1\n"
        "principal_arn = arn:aws:iam::111122223333:user/admin\n"
        "[ops]\naws_access_key_id = AKIAOPS00000000000001\naws_secret_access_key = s2\n"
        "principal_arn = arn:aws:iam::111122223333:role/operator\n"
    )
    path.chmod(0o600)
    return path


def test_the_cli_acts_as_the_configured_credentials_profile(tmp_path: Path) -> None:
    from hsmbridge.cli.runner import cli_caller

    _credentials(tmp_path)
    base = f'[service]\nregion = "us-east-1"\naccount_id = "111122223333"\n{INVENTORY}'
    default = load_settings(write(tmp_path, base))
    assert default.cli_profile == "default"
    assert cli_caller(default).principal_arn == "arn:aws:iam::111122223333:user/admin"
    ops = load_settings(write(tmp_path, base + '\n[cli]\nprofile = "ops"\n'))
    caller = cli_caller(ops)
    assert (caller.principal_arn, caller.account_id, caller.edge) == (
        "arn:aws:iam::111122223333:role/operator",
        "111122223333",
        "cli",
    )
    missing = load_settings(write(tmp_path, base + '\n[cli]\nprofile = "nobody"\n'))
    with pytest.raises(ConfigError, match=r"no \[nobody\] section"):
        cli_caller(missing)
