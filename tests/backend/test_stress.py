"""Many threads on one SoftHSM-backed backend: the per-library lock must keep SoftHSM alive.

Without serialisation SoftHSM (mutexes off under C_Initialize(NULL)) segfaults within seconds
with two threads, so finishing this run with zero errors is the test.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter

import pytest

from hsmbridge.backend.interface import Sealed
from hsmbridge.backend.pkcs11 import Pkcs11Connector

THREADS = 8
SECONDS = max(10.0, float(os.environ.get("HSMBRIDGE_STRESS_SECONDS", "10")))


@pytest.mark.slow
@pytest.mark.softhsm
def test_mixed_operations_from_many_threads(softhsm_token) -> None:
    binding, pin = softhsm_token()
    backend = Pkcs11Connector({binding.cluster_id: binding}).connect(binding.cluster_id, pin)
    labels = [f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}" for _ in range(4)]
    for label in labels:
        backend.generate_key(label, b"seed")
    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    sealed: list[tuple[str, Sealed, bytes, bytes]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def one_op(rng: random.Random) -> str:
        kind = rng.choices(["create", "find", "encrypt", "decrypt", "random"], [1, 3, 6, 6, 4])[0]
        with lock:
            label = rng.choice(labels)
        if kind == "create":
            new = f"arn:aws:kms:eu-west-1:111122223333:key/{uuid.uuid4()}"
            backend.generate_key(new, uuid.uuid4().bytes)
            with lock:
                labels.append(new)
        elif kind == "find":
            assert len(backend.find_keys(label)) == 1
        elif kind in ("encrypt", "decrypt"):
            pt, aad = rng.randbytes(rng.randrange(0, 4096)), rng.randbytes(16)
            out = backend.encrypt(label, pt, aad)
            with lock:
                sealed.append((label, out, aad, pt))
            if kind == "decrypt":
                assert backend.decrypt(label, out, aad) == pt
        else:
            assert len(backend.random(32)) == 32
        return kind

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < deadline:
                kind = one_op(rng)
                with lock:
                    counts[kind] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert errors == []
    for label, out, aad, pt in sealed:
        assert backend.decrypt(label, out, aad) == pt
    counts["final_decrypts"] = len(sealed)
    assert all(counts[k] > 0 for k in ("create", "find", "encrypt", "decrypt", "random"))
    assert len(list(backend.list_keys())) == len(labels)
    print(f"\nstress ({THREADS} threads, {SECONDS:.0f}s): {dict(counts)}; {backend.stats}")
    backend.close()
