"""A token whose information another process is rewriting is busy, not lost.

SoftHSM2 2.6.1 rereads a token's own file at every C_GetTokenInfo, and a process that logs in or
out rewrites that file: meanwhile other processes get CKR_GENERAL_ERROR for the token's
information. hsmbridge used to take that for a lost token (HsmUnreachableError on a login,
DeviceLostError from the token probe, then a re-initialisation and a new login that rewrote the
file under the others in turn): bursts of 503s whenever several instances shared a token. The
other process here is python-pkcs11 logging in, making a key and logging out in a loop, as other
instances starting, re-logging in or checking labels do. Once one read comes back torn (a blank
label), every later read in that process fails until the library is re-initialised.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11
import pytest

from hsmbridge.backend.pkcs11 import Pkcs11Connector
from hsmbridge.config import ClusterBinding

pytestmark = pytest.mark.softhsm

CHURN_S = 3.0  # the other process logs in and out for this long

_LOGIN_LOOP = """
import sys, time, pkcs11
token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
end = time.monotonic() + float(sys.argv[4])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        with token.open(rw=True, user_pin=sys.argv[3]) as session:
            if sys.argv[5] == "keys":
                session.generate_key(pkcs11.KeyType.AES, 256, label="churn", store=True).destroy()
    except pkcs11.PKCS11Error:
        pass  # this process meets the same misreads while the test logs in: keep churning
"""


@contextmanager
def _logging_in_and_out(
    binding: ClusterBinding, pin: str, *, keys: bool, seconds: float = CHURN_S
) -> Iterator[subprocess.Popen[str]]:
    profile = binding.profile
    argv = [sys.executable, "-c", _LOGIN_LOOP, profile.module_path, profile.token_label, pin]
    argv += [str(seconds), "keys" if keys else "-"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("keys", [False, True], ids=["logins", "logins-and-keys"])
def test_logins_elsewhere_neither_fail_a_login_nor_lose_the_token(softhsm_token, keys) -> None:
    binding, pin = softhsm_token()
    connector = Pkcs11Connector({binding.cluster_id: binding})
    backend = connector.connect(binding.cluster_id, pin)
    pings = logins = 0
    try:
        with _logging_in_and_out(binding, pin, keys=keys) as other:
            while other.poll() is None:
                health = backend.ping()  # generate_random + the token probe
                assert health.ok, health.detail
                pings += 1
                # Each connect looks the token up by label, as a lazy login does.
                connector.connect(binding.cluster_id, pin).close()
                logins += 1
        assert backend.random(16)  # still the same login: no re-initialisation was needed
    finally:
        backend.close()
    assert pings > 3, pings
    assert logins > 3, logins


def test_the_token_information_does_fail_meanwhile(softhsm_token) -> None:
    """The SoftHSM2 behaviour itself, so the test above cannot pass for another reason."""
    binding, pin = softhsm_token()
    lib = pkcs11.lib(binding.profile.module_path)
    failures = reads = 0
    # Logged in here too, as an instance is.
    login = lib.get_token(token_label=binding.profile.token_label).open(rw=True, user_pin=pin)
    with login, _logging_in_and_out(binding, pin, keys=False) as other:
        while other.poll() is None and not failures:
            for slot in lib.get_slots(token_present=True):
                try:
                    slot.get_token()
                except pkcs11.GeneralError:
                    failures += 1
                reads += 1
            time.sleep(0.001)
    assert failures, f"{reads} reads of the token information, none failed"
