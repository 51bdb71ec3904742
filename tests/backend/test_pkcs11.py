"""SoftHSM2-only tests of the python-pkcs11 backend: attributes, login, errors, caches, IVs."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

import pytest

from hsmbridge.backend.errors import (
    DuplicateLabelError,
    HsmUnreachableError,
    KeyMissingError,
    LoginError,
    NonCompliantKeyError,
)
from hsmbridge.backend.interface import HsmKeyInfo
from hsmbridge.backend.pkcs11 import Pkcs11Backend, Pkcs11Connector
from hsmbridge.backend.templates import violations
from hsmbridge.config import ClusterBinding, IvPolicy
from hsmbridge.model import ConnectionErrorCode
from tests import pkcs11_tool
from tests.cloudhsm_shim import softhsm2_only

pytestmark = pytest.mark.softhsm

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _arn() -> str:
    return f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}"


def _connect(binding: ClusterBinding, password: str) -> Pkcs11Backend:
    return Pkcs11Connector({binding.cluster_id: binding}).connect(binding.cluster_id, password)


@pytest.fixture
def token(softhsm_token):
    return softhsm_token()


@pytest.fixture
def backend(token):
    be = _connect(*token)
    yield be
    be.close()


def _pkcs11_tool(binding: ClusterBinding, pin: str, *args: str) -> str:
    return pkcs11_tool.run(str(binding.profile.token_label), pin, *args)


def _secret_keys_seen_by_pkcs11_tool(binding: ClusterBinding, pin: str) -> dict[str, dict]:
    return pkcs11_tool.secret_keys(str(binding.profile.token_label), pin)


def test_generated_key_attributes_through_backend_and_pkcs11_tool(token, backend) -> None:
    binding, pin = token
    label, key_id = _arn(), uuid.uuid4().bytes
    info = backend.generate_key(label, key_id)
    [again] = backend.find_keys(label)
    for seen in (info, again):
        assert seen.label == label
        assert seen.key_id == key_id
        assert (seen.key_type, seen.value_len) == ("AES", 32)
        assert (seen.token, seen.private, seen.sensitive, seen.extractable) == (
            True, True, True, False,
        )  # fmt: skip
        assert (seen.always_sensitive, seen.never_extractable, seen.local) == (True, True, True)
        assert (seen.encrypt, seen.decrypt) == (True, True)
        assert not any((seen.wrap, seen.unwrap, seen.sign, seen.verify, seen.derive))
    # An independent reader: OpenSC's pkcs11-tool in another process.
    tool = _secret_keys_seen_by_pkcs11_tool(binding, pin)[label]
    assert tool["header"] == "Secret Key Object; AES length 32"
    assert tool["id"] == key_id.hex()
    assert tool["usage"] == {"encrypt", "decrypt"}
    assert tool["access"] == {"sensitive", "always sensitive", "never extractable", "local"}


def test_wrong_password_is_invalid_credentials(token) -> None:
    binding, pin = token
    with pytest.raises(LoginError) as caught:
        _connect(binding, pin + "-wrong")
    assert caught.value.reason is ConnectionErrorCode.INVALID_CREDENTIALS
    assert pin not in str(caught.value)
    _connect(binding, pin).close()  # the failed attempt left nothing behind


def test_wrong_password_while_logged_in_is_invalid_credentials(token, backend) -> None:
    binding, _pin = token
    with pytest.raises(LoginError) as caught:
        _connect(binding, "not-the-password")
    assert caught.value.reason is ConnectionErrorCode.INVALID_CREDENTIALS
    assert backend.ping().ok  # and the existing login is untouched


def test_missing_module_is_unreachable(token, tmp_path) -> None:
    binding, pin = token
    path = str(tmp_path / "no-such-pkcs11.so")
    bad = ClusterBinding(binding.cluster_id, replace(binding.profile, module_path=path))
    with pytest.raises(HsmUnreachableError, match=re.escape(path)):
        _connect(bad, pin)


def test_unloadable_module_is_unreachable(token, tmp_path) -> None:
    binding, pin = token
    fake = tmp_path / "not-a-library.so"
    fake.write_bytes(b"not an ELF file")
    bad = ClusterBinding(binding.cluster_id, replace(binding.profile, module_path=str(fake)))
    with pytest.raises(HsmUnreachableError, match=re.escape(str(fake))):
        _connect(bad, pin)


def test_unknown_token_label_is_unreachable(token) -> None:
    binding, pin = token
    bad = ClusterBinding(binding.cluster_id, replace(binding.profile, token_label="no-such-tok"))
    with pytest.raises(HsmUnreachableError, match="no-such-tok"):
        _connect(bad, pin)


def test_unknown_cluster_is_unreachable(token) -> None:
    binding, pin = token
    with pytest.raises(HsmUnreachableError, match="cluster-nope"):
        Pkcs11Connector({binding.cluster_id: binding}).connect("cluster-nope", pin)


def _info(**overrides: object) -> HsmKeyInfo:
    good: dict[str, object] = dict(
        handle=1, label="l", key_id=b"i", key_type="AES", value_len=32, token=True, private=True,
        sensitive=True, extractable=False, always_sensitive=True, never_extractable=True,
        local=True, encrypt=True, decrypt=True, wrap=False, unwrap=False, sign=False,
        verify=False, derive=False,
    )  # fmt: skip
    return HsmKeyInfo(**{**good, **overrides})  # type: ignore[arg-type]


def test_violations_pure() -> None:
    assert violations(_info()) == []
    found = violations(_info(extractable=True, never_extractable=False, value_len=16, local=None))
    assert len(found) == 4
    assert any("EXTRACTABLE is True" in v for v in found)
    assert any("NEVER_EXTRACTABLE is False" in v for v in found)
    assert any("VALUE_LEN is 16" in v for v in found)
    assert any("LOCAL is unreadable" in v for v in found)
    assert violations(_info(key_type="GENERIC_SECRET", sign=True)) == [
        "KEY_TYPE is 'GENERIC_SECRET' (want 'AES')",
        "SIGN is True (want False)",
    ]


def test_extractable_key_made_by_pkcs11_tool_is_flagged(token, backend) -> None:
    binding, pin = token
    label = _arn()
    _pkcs11_tool(binding, pin, "--keygen", "--key-type", "AES:32", "--label", label,
                 "--id", "0a0b", "--extractable")  # fmt: skip
    [info] = backend.find_keys(label)
    problems = violations(info)
    assert any(p.startswith("EXTRACTABLE is True") for p in problems)
    assert any(p.startswith("NEVER_EXTRACTABLE is False") for p in problems)
    assert label in {k.label for k in backend.list_keys() if violations(k)}


def test_non_compliant_new_key_is_destroyed(token) -> None:
    binding, pin = token
    # SoftHSM turns SIGN/VERIFY on for AES keys when the template leaves them out (§2.3).
    lax = replace(binding.profile, template_omit=("SIGN", "VERIFY"))
    be = _connect(ClusterBinding(binding.cluster_id, lax), pin)
    label = _arn()
    with pytest.raises(NonCompliantKeyError, match="SIGN is True"):
        be.generate_key(label, b"k")
    assert be.find_keys(label) == []
    be.close()


def test_handle_cache_hit_and_out_of_band_destroy(token, backend) -> None:
    binding, pin = token
    label = _arn()
    backend.generate_key(label, b"\x01\x02")
    sealed = backend.encrypt(label, b"data", b"")
    before = backend.stats
    assert backend.decrypt(label, sealed, b"") == b"data"
    assert backend.stats.handle_cache_hits == before.handle_cache_hits + 1
    assert backend.stats.handle_cache_misses == before.handle_cache_misses
    # Destroyed behind our back by another process: the cached handle goes stale.
    _pkcs11_tool(binding, pin, "--delete-object", "--type", "secrkey", "--label", label)
    with pytest.raises(KeyMissingError):
        backend.encrypt(label, b"data", b"")
    with pytest.raises(KeyMissingError):
        backend.decrypt(label, sealed, b"")
    assert backend.ping().ok


def test_destroy_through_a_second_connector_invalidates_cache(token, backend) -> None:
    binding, pin = token
    label = _arn()
    backend.generate_key(label, b"k")
    backend.encrypt(label, b"warm the cache", b"")
    other = _connect(binding, pin)  # shares the process's one login for this token
    assert other.destroy_key(label) == 1
    other.close()  # must not log out `backend`
    with pytest.raises(KeyMissingError):
        backend.encrypt(label, b"data", b"")
    assert backend.ping().ok


@softhsm2_only  # SoftHSM2 behind the CloudHSM policy; the stand-in writes a real IV
def test_hsm_zero_buffer_iv_policy_round_trip(token) -> None:
    binding, pin = token
    # SoftHSM takes the IV we give it, so under the CloudHSM policy it uses the zeroed buffer
    # itself: the IV comes back as 12 zero bytes. This still proves the plumbing - a fresh
    # bytearray per call passed as pIv and read back after C_Encrypt - decrypts correctly.
    cloudish = replace(binding.profile, iv_policy=IvPolicy.HSM_ZERO_BUFFER)
    be = _connect(ClusterBinding(binding.cluster_id, cloudish), pin)
    label = _arn()
    be.generate_key(label, b"k")
    sealed = be.encrypt(label, b"plaintext", b"aad")
    assert sealed.iv == bytes(12)
    assert be.decrypt(label, sealed, b"aad") == b"plaintext"
    be.close()


def test_close_is_idempotent_and_final(token) -> None:
    binding, pin = token
    be = _connect(binding, pin)
    label = _arn()
    be.generate_key(label, b"k")
    assert be.stats.sessions_open >= 2  # the login session and one worker
    be.close()
    be.close()
    with pytest.raises(HsmUnreachableError):
        be.encrypt(label, b"x", b"")
    assert not be.ping().ok
    again = _connect(binding, pin)  # logged out cleanly, so a new login works
    assert [k.label for k in again.find_keys(label)] == [label]
    again.close()


def test_fresh_label_skips_the_label_search_and_the_default_refuses(backend) -> None:
    # fresh_label is the caller's promise (a new UUID4 ARN); the backend really does not search,
    # so a broken promise shows up as a duplicate, which `hsmbridge audit` reports.
    label = _arn()
    backend.generate_key(label, b"first", fresh_label=True)
    with pytest.raises(DuplicateLabelError):
        backend.generate_key(label, b"second")
    backend.generate_key(label, b"second", fresh_label=True)
    assert sorted(k.key_id for k in backend.find_keys(label)) == [b"first", b"second"]
    assert backend.destroy_key(label) == 2
