"""The kmsuser password vault: AES-GCM at rest, bound to the store id."""

from __future__ import annotations

import os
import stat

import pytest

from hsmbridge.errors import ConfigError
from hsmbridge.keystore.passwords import (
    KEY_SIZE,
    PasswordRecord,
    PasswordVault,
    SealedPasswordError,
)

PASSWORD = "Sup3rSecretPw"
STORE = "cks-0123456789abcdef0"
OTHER_STORE = "cks-0123456789abcdef1"


@pytest.fixture
def key_file(tmp_path):
    return tmp_path / "master.key"


@pytest.fixture
def vault(key_file):
    return PasswordVault(key_file)


def test_round_trip(vault):
    blob = vault.seal(PASSWORD, STORE)
    assert PASSWORD.encode() not in blob
    assert vault.unseal(blob, STORE) == PASSWORD


def test_each_seal_uses_a_fresh_nonce(vault):
    assert vault.seal(PASSWORD, STORE) != vault.seal(PASSWORD, STORE)


def test_key_persists_across_instances(key_file, vault):
    blob = vault.seal(PASSWORD, STORE)
    assert PasswordVault(key_file).unseal(blob, STORE) == PASSWORD


def test_wrong_store_id_is_refused(vault):
    blob = vault.seal(PASSWORD, STORE)
    with pytest.raises(SealedPasswordError) as info:
        vault.unseal(blob, OTHER_STORE)
    assert OTHER_STORE in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("index", [0, 1, 13, -1])
def test_tampered_blob_is_refused(vault, index):
    blob = bytearray(vault.seal(PASSWORD, STORE))
    blob[index] ^= 0x01
    with pytest.raises(SealedPasswordError) as info:
        vault.unseal(bytes(blob), STORE)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)


def test_truncated_blob_is_refused(vault):
    with pytest.raises(SealedPasswordError, match="malformed"):
        vault.unseal(vault.seal(PASSWORD, STORE)[:20], STORE)


def test_other_master_key_is_refused(tmp_path, vault):
    blob = vault.seal(PASSWORD, STORE)
    other = PasswordVault(tmp_path / "other.key")
    with pytest.raises(SealedPasswordError, match="master key"):
        other.unseal(blob, STORE)


def test_key_file_is_created_0600_with_32_bytes(key_file, vault):
    st = key_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == KEY_SIZE
    # no temporary files are left next to it
    assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]


def test_refuses_world_readable_key_file(key_file):
    key_file.write_bytes(os.urandom(KEY_SIZE))
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"group or others \(mode 0644\).*chmod 600"):
        PasswordVault(key_file)


def test_refuses_group_readable_key_file(key_file):
    key_file.write_bytes(os.urandom(KEY_SIZE))
    key_file.chmod(0o640)
    with pytest.raises(ConfigError, match="group or others"):
        PasswordVault(key_file)


@pytest.mark.parametrize("size", [0, 16, 33])
def test_refuses_wrong_size_key_file(key_file, size):
    key_file.write_bytes(os.urandom(size))
    key_file.chmod(0o600)
    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        PasswordVault(key_file)


def test_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be created"):
        PasswordVault(tmp_path / "missing" / "master.key")


def test_repr_shows_no_secret(key_file, vault):
    text = repr(vault)
    assert str(key_file) in text
    assert key_file.read_bytes().hex() not in text
    assert "PasswordVault" in text


def test_a_rotation_record_round_trips_and_plain_blobs_read_as_records(vault):
    record = PasswordRecord(PASSWORD, ("NewRotated1", "NewRotated2"))
    blob = vault.seal_record(record, STORE)
    assert blob[0] == 2
    for secret in (PASSWORD, "NewRotated1", "NewRotated2"):
        assert secret.encode() not in blob
    assert vault.unseal_record(blob, STORE) == record
    assert vault.unseal(blob, STORE) == PASSWORD  # the current one, as before rotation existed
    plain = vault.seal_record(PasswordRecord(PASSWORD), STORE)
    assert plain[0] == 1  # without pending passwords: the version-1 blob, readable by old code
    assert vault.unseal_record(vault.seal(PASSWORD, STORE), STORE) == PasswordRecord(PASSWORD)
    with pytest.raises(SealedPasswordError):
        vault.unseal_record(blob, OTHER_STORE)


def test_record_candidates_and_repr():
    record = PasswordRecord("current-pw", ("pending-a", "current-pw", "pending-b"))
    assert record.candidates() == ("current-pw", "pending-a", "pending-b")
    assert "pw" not in repr(record)
    assert "pending-" not in repr(record)
