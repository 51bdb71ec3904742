"""Keys another process made on the token, after this process wrote to it.

SoftHSM2 2.6.1 re-reads a token's object list only when the token's change counter moved since
the process last looked, and a process that writes records the counter it wrote as seen: after
another process creates X and this one then creates Y, this process does not see X. hsmbridge
served ~2% of Encrypts under keys another worker made as "key material not in the cluster", and
a deletion swept by such a process left the material behind. With the profile's
`stale_cross_process_view`, the backend looks for a missing key again after re-reading the
token. The other process here is python-pkcs11 on the same token, as another worker would be.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import replace

import pytest

from hsmbridge.backend.errors import KeyMissingError
from hsmbridge.backend.pkcs11 import Pkcs11Backend, Pkcs11Connector
from hsmbridge.backend.sessions import load_library
from hsmbridge.config import ClusterBinding
from tests.cloudhsm_shim import softhsm2_only

pytestmark = [pytest.mark.softhsm, softhsm2_only]

_OTHER_PROCESS = """
import sys, pkcs11
from pkcs11 import KeyType
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3], rw=True) as s:
    s.generate_key(KeyType.AES, 256, label=sys.argv[4], store=True)
"""


def _made_elsewhere(binding: ClusterBinding, pin: str) -> str:
    label = f"arn:aws:kms:us-east-1:111122223333:key/{uuid.uuid4()}"
    profile = binding.profile
    argv = [sys.executable, "-c", _OTHER_PROCESS, profile.module_path, profile.token_label, pin]
    subprocess.run([*argv, label], check=True, timeout=60)
    return label


def _backend(binding: ClusterBinding, pin: str) -> Pkcs11Backend:
    return Pkcs11Connector({binding.cluster_id: binding}).connect(binding.cluster_id, pin)


def _stale(backend: Pkcs11Backend, binding: ClusterBinding, pin: str) -> str:
    """A key another process made, then a key of our own: the first one is now out of sight."""
    backend.list_keys()  # this process has looked at the token
    theirs = _made_elsewhere(binding, pin)
    backend.generate_key(f"ours-{uuid.uuid4()}", b"ours", fresh_label=True)
    return theirs


def test_a_key_another_process_made_is_used_and_destroyed(softhsm_token) -> None:
    binding, pin = softhsm_token()
    backend = _backend(binding, pin)
    try:
        theirs = _stale(backend, binding, pin)
        sealed = backend.encrypt(theirs, b"made elsewhere", b"aad")
        assert backend.decrypt(theirs, sealed, b"aad") == b"made elsewhere"
        gone = _stale(backend, binding, pin)
        assert backend.destroy_key(gone) == 1  # not 0, leaving the material behind
        assert backend.find_keys(gone) == []
    finally:
        backend.close()


def test_without_the_profile_setting_the_key_stays_out_of_sight(softhsm_token) -> None:
    """The defect itself, so the test above cannot pass for another reason."""
    binding, pin = softhsm_token()
    profile = replace(binding.profile, stale_cross_process_view=False)
    binding = replace(binding, profile=profile)
    backend = _backend(binding, pin)
    try:
        theirs = _stale(backend, binding, pin)
        with pytest.raises(KeyMissingError):
            backend.encrypt(theirs, b"x", b"aad")
        assert backend.destroy_key(_stale(backend, binding, pin)) == 0
    finally:
        backend.close()


@pytest.mark.parametrize("misses", [1, 2, 3])
def test_a_missing_key_is_looked_for_in_up_to_two_re_read_views(
    softhsm_token, monkeypatch, misses
) -> None:
    """A re-read view was once measured still lacking a key another instance made seconds
    before (beside a SIGKILLed instance, under load); here the first `misses` looks miss."""
    binding, pin = softhsm_token()
    backend = _backend(binding, pin)
    try:
        label = f"ours-{uuid.uuid4()}"
        backend.generate_key(label, b"ours", fresh_label=True)
        library = load_library(binding.profile.module_path)
        generation = library.generation
        real_run, looks = backend._run, []

        def run(op, **kwargs):
            looks.append(library.generation)
            if len(looks) <= misses:
                raise KeyMissingError(f"look {len(looks)} misses")
            return real_run(op, **kwargs)

        monkeypatch.setattr(backend, "_run", run)
        if misses == 3:
            with pytest.raises(KeyMissingError, match="look 3 misses"):
                backend.encrypt(label, b"x", b"aad")
        else:
            assert backend.decrypt(label, backend.encrypt(label, b"x", b"aad"), b"aad") == b"x"
        # Each look after a miss is in a view re-read since that miss began.
        assert looks[: misses + 1] == [generation + n for n in range(min(misses, 2) + 1)]
    finally:
        backend.close()
