"""In-process measurements, one family per subprocess (SoftHSM reads its config once per process).

    python -m benchmarks.inproc raw       --config C --seconds S   # the python-pkcs11 limit
    python -m benchmarks.inproc service   --config C --seconds S   # KmsService in-process
    python -m benchmarks.inproc fill      --config C --target N    # bulk-load keys to N
    python -m benchmarks.inproc scale     --config C --seconds S   # latency/create rate at N
    python -m benchmarks.inproc enumerate --config C               # raw token enumeration

Each prints one JSON document on its last stdout line. Every loop stops at a deadline and a
maximum count, whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import summarize
from hsmbridge import bootstrap
from hsmbridge.config import HsmProfile, Settings, load_settings
from hsmbridge.identity.credentials import cli_principal
from hsmbridge.request import RequestContext

MAX_OPS = 2_000_000  # hard cap on any timed loop, whatever the deadline


def timed(fn: Callable[[int], object], seconds: float, max_ops: int = MAX_OPS) -> dict[str, Any]:
    """Call fn(i) until `seconds` pass or `max_ops` calls; per-call latency and the rate."""
    lat: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    i = 0
    while i < max_ops:
        t0 = clock()
        fn(i)
        t1 = clock()
        lat.append(t1 - t0)
        i += 1
        if t1 >= deadline:
            break
    return summarize(lat, clock() - start)


def _settings(config: Path) -> tuple[Settings, HsmProfile, str]:
    settings = load_settings(config)
    bootstrap.prepare_host(settings)  # SOFTHSM2_CONF must be set before the module loads
    binding = next(iter(settings.clusters.values()))
    password = (settings.data_dir / "kmsuser.password").read_text().strip()
    return settings, binding.profile, binding.profile.login_pin(password)


def _arn(settings: Settings, key_id: str) -> str:
    from hsmbridge import ids

    return ids.key_arn(settings.partition, settings.region, settings.account_id, key_id)


def _template(profile: HsmProfile, label: str, key_id: str) -> Any:
    # The backend's own name -> pkcs11.Attribute conversion, so raw keys are generated with
    # exactly the template CreateKey uses (a private helper: the smoke test catches renames).
    from hsmbridge.backend.pkcs11 import _p11_template
    from hsmbridge.backend.templates import key_template

    return _p11_template(key_template(label, key_id.encode(), profile.template_omit))


# --- 1. the raw limit --------------------------------------------------------------------------


def cmd_raw(args: argparse.Namespace) -> dict[str, Any]:
    import uuid

    import pkcs11
    from pkcs11 import GCMParams, KeyType, Mechanism

    settings, profile, pin = _settings(args.config)
    lib = pkcs11.lib(profile.module_path)
    token = lib.get_token(token_label=profile.token_label)
    out: dict[str, Any] = {}
    with token.open(rw=True, user_pin=pin) as session:

        def keygen(_i: int) -> None:
            key_id = str(uuid.uuid4())
            label = _arn(settings, key_id)
            session.generate_key(
                KeyType.AES, 256, label=label, id=key_id.encode(), store=True,
                template=_template(profile, label, key_id),
            )  # fmt: skip

        # Persistent keygen is ~5 ms; cap the count so a quick run does not fill the token.
        out["keygen_persistent"] = timed(keygen, args.seconds, max_ops=args.max_keys)
        key_id = str(uuid.uuid4())
        label = _arn(settings, key_id)
        key: Any = session.generate_key(
            KeyType.AES, 256, label=label, id=key_id.encode(), store=True,
            template=_template(profile, label, key_id),
        )  # fmt: skip
        aad = label.encode()
        pt32, pt4k = os.urandom(32), os.urandom(4096)

        def enc(data: bytes) -> Callable[[int], object]:
            # A fresh caller IV per call, as hsmbridge does on SoftHSM (the honest raw loop).
            def op(_i: int) -> object:
                return key.encrypt(
                    data,
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(os.urandom(12), aad, 128),
                )

            return op

        key.encrypt(pt32, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(b"\0" * 12))
        out["gcm_encrypt_32"] = timed(enc(pt32), args.seconds)
        out["gcm_encrypt_4096"] = timed(enc(pt4k), args.seconds)
        iv = os.urandom(12)
        ct = key.encrypt(pt32, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
        out["gcm_decrypt_32"] = timed(
            lambda _i: key.decrypt(
                ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)
            ),
            args.seconds,
        )
        out["random_32"] = timed(lambda _i: session.generate_random(256), args.seconds)
    return out


# --- 2. the service layer in-process -----------------------------------------------------------


def _open_service(config: Path) -> tuple[Any, str]:
    from hsmbridge.trail.events import NullSink

    settings, _profile, _pin = _settings(config)
    # NullSink: the in-process numbers are the service layer's; the HTTP server keeps its
    # real JSON-lines audit sink, so its cost shows in the HTTP numbers.
    svc = bootstrap.open_service(settings, audit=NullSink())
    svc.start(sweep_interval_s=None)
    store_id = svc.ctx.meta.list_key_stores(1, None)[0].store.store_id
    return svc, store_id


def _create_request(store_id: str, i: int) -> Any:
    from hsmbridge.service.keys import CreateKeyRequest

    return CreateKeyRequest(
        custom_key_store_id=store_id, origin="AWS_CLOUDHSM", description=f"bench {i}"
    )


def _caller(svc: Any) -> RequestContext:
    """The environment's administrator (the credentials file's CLI principal, whose IAM policy
    `hsmbridge init` writes): every call is authorized against its policies, as for a client."""
    settings = svc.ctx.settings
    principal = cli_principal(settings.credentials_file, settings.cli_profile)
    return RequestContext(principal.arn, principal.account_id)


def _profile_text(fn: Callable[[int], object], seconds: float, path: Path) -> None:
    """pyinstrument over an extra, unmeasured loop: where in-process time goes."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    timed(fn, seconds)
    profiler.stop()
    path.write_text(profiler.output_text(unicode=False, color=False, show_all=False))


def cmd_service(args: argparse.Namespace) -> dict[str, Any]:
    svc, store_id = _open_service(args.config)
    caller = _caller(svc)
    try:
        out: dict[str, Any] = {}
        out["CreateKey"] = timed(
            lambda i: svc.keys.create(caller, _create_request(store_id, i)),
            args.seconds,
            max_ops=args.max_keys,
        )
        key_id = svc.keys.create(caller, _create_request(store_id, -1)).key_id
        pt = os.urandom(32)
        svc.crypto.encrypt(caller, key_id, pt)  # warm the handle cache

        def encrypt(_i: int) -> object:
            return svc.crypto.encrypt(caller, key_id, pt)

        out["Encrypt"] = timed(encrypt, args.seconds)
        blob = svc.crypto.encrypt(caller, key_id, pt).ciphertext_blob
        out["Decrypt"] = timed(lambda _i: svc.crypto.decrypt(caller, blob), args.seconds)
        out["GenerateDataKey"] = timed(
            lambda _i: svc.crypto.generate_data_key(caller, key_id, key_spec="AES_256"),
            args.seconds,
        )
        if args.profile_dir is not None:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
            _profile_text(encrypt, args.seconds, args.profile_dir / "service_encrypt.txt")
            _profile_text(
                lambda i: svc.keys.create(caller, _create_request(store_id, 10_000_000 + i)),
                min(args.seconds, 1.0),
                args.profile_dir / "service_createkey.txt",
            )
        return out
    finally:
        svc.close()


# --- 5. scale ----------------------------------------------------------------------------------


def cmd_fill(args: argparse.Namespace) -> dict[str, Any]:
    """Bring the store to `target` keys the fast way: raw keygen with CreateKey's template plus
    LIVE metadata rows in batched transactions. CreateKey itself would be slower and slower as
    the token grows (it searches the token for the label first), and the point here is to build
    the population once, not to measure creation."""
    import uuid

    from pkcs11 import KeyType

    from hsmbridge.backend.sessions import acquire_pool
    from hsmbridge.model import KeyRecord, KeyState
    from hsmbridge.policy.document import default_policy

    settings, profile, pin = _settings(args.config)
    meta = bootstrap.open_metadata_store(settings)
    store = meta.list_key_stores(1, None)[0].store
    have = meta.count_keys_in_store(store.store_id)
    need = max(0, args.target - have)
    policy = default_policy(settings.partition, settings.account_id)
    pool = acquire_pool(profile, pin)
    start = time.perf_counter()
    done = 0
    try:
        while done < need:
            batch: list[KeyRecord] = []
            with pool.session() as worker:
                for _ in range(min(500, need - done)):
                    key_id = str(uuid.uuid4())
                    arn = _arn(settings, key_id)
                    worker.raw.generate_key(
                        KeyType.AES, 256, label=arn, id=key_id.encode(), store=True,
                        template=_template(profile, arn, key_id),
                    )  # fmt: skip
                    batch.append(
                        KeyRecord(
                            key_id=key_id, arn=arn, account_id=settings.account_id,
                            region=settings.region, custom_key_store_id=store.store_id,
                            cluster_id=store.cluster_id, description="bench fill",
                            base_state=KeyState.ENABLED, creation_date=time.time(),
                            policy=policy,
                        )
                    )  # fmt: skip
            with meta.write():
                for record in batch:
                    meta.put_key(record)
            done += len(batch)
    finally:
        pool.release()
        meta.close()
    seconds = time.perf_counter() - start
    return {
        "had": have,
        "created": done,
        "total": have + done,
        "seconds": round(seconds, 3),
        "ms_per_key": round(seconds / done * 1000, 3) if done else 0.0,
    }


def cmd_scale(args: argparse.Namespace) -> dict[str, Any]:
    svc, store_id = _open_service(args.config)
    caller = _caller(svc)
    try:
        keys = svc.ctx.meta.keys_in_store(store_id)
        rng = random.Random(42)  # noqa: S311 (choice of keys, not cryptography)
        pt = os.urandom(32)
        hot = keys[0].key_id
        svc.crypto.encrypt(caller, hot, pt)
        out: dict[str, Any] = {"keys": len(keys), "hot_key": hot}
        out["Encrypt_hot"] = timed(lambda _i: svc.crypto.encrypt(caller, hot, pt), args.seconds)
        # First use of a key in this process: the label search in the token (linear in N).
        cold = rng.sample([k.key_id for k in keys[1:]], min(args.cold, len(keys) - 1))
        out["Encrypt_first_use"] = timed(
            lambda i: svc.crypto.encrypt(caller, cold[i], pt), args.seconds, max_ops=len(cold)
        )
        out["CreateKey"] = timed(
            lambda i: svc.keys.create(caller, _create_request(store_id, i)),
            args.seconds,
            max_ops=args.max_keys,
        )
        return out
    finally:
        svc.close()


def cmd_enumerate(args: argparse.Namespace) -> dict[str, Any]:
    """What an audit must at least do: list every secret key and read its label and id."""
    start = time.perf_counter()
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    _, profile, pin = _settings(args.config)
    lib = pkcs11.lib(profile.module_path)
    token = lib.get_token(token_label=profile.token_label)
    loaded = time.perf_counter()
    with token.open(rw=False, user_pin=pin) as session:
        objs = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        found = time.perf_counter()
        labels = [o.get_attributes([Attribute.LABEL, Attribute.ID]) for o in objs]
    done = time.perf_counter()
    return {
        "objects": len(labels),
        "seconds": round(done - start, 4),
        "load_login_s": round(loaded - start, 4),
        "find_s": round(found - loaded, 4),
        "attributes_s": round(done - found, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.inproc")
    parser.add_argument("mode", choices=["raw", "service", "fill", "scale", "enumerate"])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--max-keys", type=int, default=500)
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--cold", type=int, default=50)
    parser.add_argument("--profile-dir", type=Path)
    args = parser.parse_args()
    handler = {
        "raw": cmd_raw,
        "service": cmd_service,
        "fill": cmd_fill,
        "scale": cmd_scale,
        "enumerate": cmd_enumerate,
    }[args.mode]
    print(json.dumps(handler(args)), flush=True)


if __name__ == "__main__":
    main()
