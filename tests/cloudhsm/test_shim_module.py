"""The CloudHSM stand-in module itself, through python-pkcs11 in child processes.

Each check runs in processes of its own with stand-in settings of its own (the stand-in reads
them when it initialises), on a fresh SoftHSM2 token of the run's stock. What is checked is what
the stand-in promises to do as CloudHSM's SDK 5 library does: "USER:password" logins and lockout
counted across processes, passwords checked against the cluster's records, the HSM-written GCM
IV, the decrypt tag error, the 16 KB single-part limit, the functions and attributes SDK 5 lacks,
one slot per cluster, a search that sees other processes' keys, and the injected faults.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hsmbridge.config import ClusterBinding
from tests.cloudhsm_shim import build_shim, shim_conf

pytestmark = pytest.mark.softhsm

_PREAMBLE = """
import json, os, sys, uuid
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11.mechanisms import GCMParams
lib = pkcs11.lib(sys.argv[1])
LABEL, PIN = sys.argv[2], sys.argv[3]
ARGS = sys.argv[4:]
def outcome(fn):
    try:
        return fn()
    except Exception as exc:
        return type(exc).__name__
def gcm(iv, aad=b"aad"):
    return dict(mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
TEMPLATE = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.ID: b"k"}
def new_key(session, label=None):
    label = label or f"arn:aws:kms:us-east-1:111122223333:key/{uuid.uuid4()}"
    return session.generate_key(KeyType.AES, 256, label=label, store=True, template=TEMPLATE)
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    return build_shim()


@pytest.fixture
def token(softhsm_token: Callable[..., tuple[ClusterBinding, str]]) -> tuple[str, str]:
    binding, pin = softhsm_token()
    assert binding.profile.token_label is not None
    return binding.profile.token_label, pin


def run(shim: Path, conf: Path, token: tuple[str, str], code: str, *args: str) -> Any:
    """Run `code` (after the preamble) in a child process; its last printed line, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", _PREAMBLE + textwrap.dedent(code), str(shim), *token, *args],
        env={**os.environ, "HSMBRIDGE_SHIM_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def login(shim: Path, conf: Path, token: tuple[str, str], pin: str) -> str:
    code = """
    def log_in():
        lib.get_token(token_label=LABEL).open(user_pin=ARGS[0]).close()
        return "ok"
    print(json.dumps(outcome(log_in)))
    """
    return str(run(shim, conf, token, code, pin))


def test_login_takes_user_colon_password_and_locks_after_five_failures(shim, token, tmp_path):
    conf = shim_conf(tmp_path)
    label, pin = token
    assert login(shim, conf, token, pin) == "PinIncorrect"  # a bare password names no user
    assert login(shim, conf, token, f"alice:{pin}") == "UserPinNotInitialized"  # no such CU
    assert login(shim, conf, token, f"kmsuser:{pin}") == "ok"
    # Four failures in four processes, then a success: the count starts again.
    for _ in range(4):
        assert login(shim, conf, token, "kmsuser:wrong-password") == "PinIncorrect"
    assert login(shim, conf, token, f"kmsuser:{pin}") == "ok"
    for _ in range(5):
        assert login(shim, conf, token, "kmsuser:wrong-password") == "PinIncorrect"
    # Locked: even the right password is refused, without reaching the HSM.
    assert login(shim, conf, token, f"kmsuser:{pin}") == "PinLocked"
    state = tmp_path / "state" / label
    assert (state / "failed-logins" / "kmsuser").read_text().strip() == "5"
    # The cluster's users are data: a CU it lists logs in; one it no longer lists is not found.
    (state / "users").write_text("appuser\n")
    assert login(shim, conf, token, f"appuser:{pin}") == "ok"
    assert login(shim, conf, token, f"kmsuser:{pin}") == "UserPinNotInitialized"


def test_a_user_with_a_password_record_logs_in_with_the_token_pin_behind_it(shim, token, tmp_path):
    conf = shim_conf(tmp_path)
    label, pin = token
    state = tmp_path / "state" / label
    state.mkdir(parents=True)
    salt, password = os.urandom(16), "record-password-1"
    digest = hashlib.sha256(salt + f"kmsuser:{password}".encode()).digest()
    # Hex in either case; blanks between the fields; the first line naming a user counts.
    (state / "users").write_text(
        f"kmsuser\t{salt.hex().upper()}  {digest.hex()}\nappuser\nbroken 00ff\nkmsuser\n"
    )
    assert login(shim, conf, token, f"kmsuser:{password}") == "GeneralError"  # no token-pin
    (state / "token-pin").write_text("not-the-pin\n")
    assert login(shim, conf, token, f"kmsuser:{password}") == "GeneralError"  # SoftHSM2 refuses
    assert not (state / "failed-logins" / "kmsuser").exists()  # neither is the user's failure
    (state / "token-pin").write_text(f"{pin}\n")
    assert login(shim, conf, token, f"kmsuser:{password}") == "ok"
    # The record decides: SoftHSM2's PIN is not kmsuser's password; a passthrough user's it is.
    assert login(shim, conf, token, f"kmsuser:{pin}") == "PinIncorrect"
    assert (state / "failed-logins" / "kmsuser").read_text().strip() == "1"
    assert login(shim, conf, token, f"appuser:{pin}") == "ok"
    assert login(shim, conf, token, f"broken:{pin}") == "GeneralError"
    assert not (state / "failed-logins" / "broken").exists()
    for _ in range(4):
        assert login(shim, conf, token, "kmsuser:wrong-password") == "PinIncorrect"
    assert login(shim, conf, token, f"kmsuser:{password}") == "PinLocked"


def test_officer_logins_and_functions_sdk5_lacks_are_refused(shim, token, tmp_path):
    result = run(
        shim,
        shim_conf(tmp_path),
        token,
        """
        tok = lib.get_token(token_label=LABEL)
        try:  # python-pkcs11 has no class for CKR_USER_TYPE_INVALID, only this message
            tok.open(rw=True, so_pin="any-so-pin")
            out = {"so": "logged in"}
        except pkcs11.PKCS11Error as exc:
            out = {"so": str(exc)}
        s = tok.open(rw=True, user_pin="kmsuser:" + PIN)
        key = new_key(s)
        out["seed"] = outcome(lambda: s.seed_random(b"entropy"))
        out["set_pin"] = outcome(lambda: s.set_pin("kmsuser:" + PIN, "kmsuser:another-pin"))
        out["set_attribute"] = outcome(lambda: key.__setitem__(Attribute.LABEL, "renamed"))
        out["copy"] = outcome(lambda: key.copy({Attribute.LABEL: "copy"}))
        out["modifiable_in_template"] = outcome(lambda: s.generate_key(
            KeyType.AES, 256, label="m", store=True, template={Attribute.MODIFIABLE: False}))
        out["read_start_date"] = outcome(lambda: key[Attribute.START_DATE])
        out["read_back"] = [key[Attribute.LOCAL], key[Attribute.NEVER_EXTRACTABLE],
                            key[Attribute.ALWAYS_SENSITIVE], key[Attribute.VALUE_LEN]]
        print(json.dumps(out))
        """,
    )
    assert result == {
        "so": "User type invalid. Should never see this.",
        "seed": "FunctionNotSupported",
        "set_pin": "FunctionNotSupported",
        "set_attribute": "FunctionNotSupported",
        "copy": "FunctionNotSupported",
        "modifiable_in_template": "TemplateInconsistent",
        "read_start_date": "AttributeTypeInvalid",
        "read_back": [True, True, True, 32],
    }


def test_gcm_iv_is_written_by_the_hsm_and_limits_hold(shim, token, tmp_path):
    result = run(
        shim,
        shim_conf(tmp_path),
        token,
        """
        s = lib.get_token(token_label=LABEL).open(rw=True, user_pin="kmsuser:" + PIN)
        key = new_key(s)
        out = {}
        ivs = []
        for _ in range(3):
            iv = bytearray(12)
            ct = key.encrypt(b"plaintext", **gcm(iv))
            ivs.append(bytes(iv).hex())
            assert key.decrypt(ct, **gcm(bytes(iv))) == b"plaintext"
        out["ivs"] = ivs
        out["length"] = len(ct)
        tampered = ct[:-1] + bytes([ct[-1] ^ 1])
        out["tampered"] = outcome(lambda: key.decrypt(tampered, **gcm(bytes(iv))))
        out["wrong_aad"] = outcome(lambda: key.decrypt(ct, **gcm(bytes(iv), b"other")))
        out["caller_iv"] = outcome(lambda: key.encrypt(b"x", **gcm(bytearray(os.urandom(12)))))
        out["short_iv"] = outcome(lambda: key.encrypt(b"x", **gcm(bytearray(8))))
        out["16k"] = len(key.encrypt(b"x" * 16384, **gcm(bytearray(12))))
        out["16k+1"] = outcome(lambda: key.encrypt(b"x" * 16385, **gcm(bytearray(12))))
        big = b"y" * 16400
        out["decrypt_16k+"] = outcome(lambda: key.decrypt(big, **gcm(bytes(12))))
        # The refused operation was ended: the session goes on working.
        out["after"] = len(key.encrypt(b"z", **gcm(bytearray(12))))
        print(json.dumps(out))
        """,
    )
    ivs = result.pop("ivs")
    assert len(set(ivs)) == 3
    assert "00" * 12 not in ivs
    assert result == {
        "length": 9 + 16,  # ciphertext || tag; the IV is not appended
        "tampered": "EncryptedDataInvalid",
        "wrong_aad": "EncryptedDataInvalid",
        "caller_iv": "MechanismParamInvalid",
        "short_iv": "MechanismParamInvalid",
        "16k": 16384 + 16,
        "16k+1": "DataLenRange",
        "decrypt_16k+": "DataLenRange",
        "after": 1 + 16,
    }


def test_one_slot_per_cluster(shim, token, tmp_path):
    label, _ = token
    code = """
    print(json.dumps([s.get_token().label for s in lib.get_slots(token_present=True)]))
    """
    assert run(shim, shim_conf(tmp_path / "one", token_label=label), token, code) == [label]
    assert len(run(shim, shim_conf(tmp_path / "all"), token, code)) > 1


_HOLD_AND_LOOK = """
import subprocess
s = lib.get_token(token_label=LABEL).open(rw=True, user_pin="kmsuser:" + PIN)
list(s.get_objects({Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}))  # this process has looked
subprocess.run([sys.executable, "-c", ARGS[0], sys.argv[1], LABEL, PIN, ARGS[1]], check=True)
new_key(s)  # this process writes: SoftHSM2 alone would now miss the other process's key
found = list(s.get_objects({Attribute.LABEL: ARGS[1]}))
print(json.dumps(len(found)))
"""

_MAKE_ONE = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType
s = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2]).open(
    rw=True, user_pin="kmsuser:" + sys.argv[3])
s.generate_key(KeyType.AES, 256, label=sys.argv[4], store=True,
               template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
"""


def test_a_search_sees_keys_other_processes_made(shim, token, tmp_path):
    label = "arn:aws:kms:us-east-1:111122223333:key/made-elsewhere"
    assert run(shim, shim_conf(tmp_path), token, _HOLD_AND_LOOK, _MAKE_ONE, label) == 1


def test_injected_faults(shim, token, tmp_path):
    conf = shim_conf(tmp_path)
    faults = tmp_path / "faults"
    result = run(
        shim,
        conf,
        token,
        """
        import time
        faults = ARGS[0]
        def inject(text):
            with open(faults, "w") as fh:
                fh.write(text)
            os.utime(faults, ns=(time.time_ns(), time.time_ns() + 1))  # a new mtime, surely
        s = lib.get_token(token_label=LABEL).open(rw=True, user_pin="kmsuser:" + PIN)
        key = new_key(s)
        out = {}
        inject("throttle_rate = 1\\n")
        out["throttled"] = outcome(lambda: key.encrypt(b"x", **gcm(bytearray(12))))
        inject("throttle_rate = 0\\nlatency_ms = 150\\n")
        start = time.monotonic()
        key.encrypt(b"x", **gcm(bytearray(12)))
        out["slow"] = time.monotonic() - start >= 0.15
        inject("key_availability_fails = 1\\n")
        out["token_key"] = outcome(lambda: new_key(s))
        out["session_key"] = outcome(lambda: s.generate_key(KeyType.AES, 256, store=False) and "ok")
        inject("down = 1\\n")
        out["down_encrypt"] = outcome(lambda: key.encrypt(b"x", **gcm(bytearray(12))))
        out["down_slots"] = len(lib.get_slots(token_present=True))
        inject("")
        out["back"] = len(key.encrypt(b"x", **gcm(bytearray(12))))
        print(json.dumps(out))
        """,
        str(faults),
    )
    assert result == {
        "throttled": "FunctionFailed",
        "slow": True,
        "token_key": "FunctionFailed",
        "session_key": "ok",
        "down_encrypt": "DeviceRemoved",
        "down_slots": 0,
        "back": 17,
    }


_HALF_MADE = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
# What SoftHSM2 leaves when a process is killed inside C_GenerateKey: no label, id or value.
s = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2]).open(rw=True, user_pin=sys.argv[3])
s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                 Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.VALUE: b"",
                 Attribute.LABEL: "", Attribute.ID: b""})
"""


def test_a_search_never_shows_a_half_made_key(shim, token, tmp_path):
    label, pin = token
    subprocess.run(
        [sys.executable, "-c", _HALF_MADE, "/usr/lib/softhsm/libsofthsm2.so", label, pin],
        check=True,
        timeout=60,
    )
    code = """
    s = lib.get_token(token_label=LABEL).open(rw=True, user_pin="kmsuser:" + PIN)
    new_key(s, "arn:aws:kms:us-east-1:111122223333:key/whole")
    secret = {Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}
    print(json.dumps([o[Attribute.LABEL] for o in s.get_objects(secret)]))
    """
    assert run(shim, shim_conf(tmp_path), token, code) == [
        "arn:aws:kms:us-east-1:111122223333:key/whole"
    ]


def test_duplicate_labels_are_allowed_as_on_cloudhsm(shim, token, tmp_path):
    code = """
    s = lib.get_token(token_label=LABEL).open(rw=True, user_pin="kmsuser:" + PIN)
    same = "arn:aws:kms:us-east-1:111122223333:key/twice"
    new_key(s, same)
    new_key(s, same)
    print(json.dumps(len(list(s.get_objects({Attribute.LABEL: same})))))
    """
    assert run(shim, shim_conf(tmp_path), token, code) == 2
