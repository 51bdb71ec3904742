"""Crash consistency: SIGKILL the real server at injected points and at random times under load,
restart it, and audit HSM labels against metadata after every restart.

The environment comes from `python -m hsmbridge init` (its own SoftHSM token directory; the pytest
process never loads it). Servers run as subprocesses: `tests/reliability/crash_server.py` (the
production `create_app` + `serve` with a wrapped connector that blocks at a named kill point, and a
fast clock so deletion waiting periods pass in under a second) and, every few cycles and at the
end, plain `python -m hsmbridge serve`. Each restart runs start-up recovery; then the store must
be consistent: no intent rows, every LIVE key's material present exactly once, no orphan or
duplicate labels except recorded disconnected-deletion orphans.

Keys are never lost: every key whose CreateKey answered and that the test never scheduled for
deletion must, after every restart it is sampled in and for all of them at the end, be Enabled and
decrypt what it encrypted. NotFound or another state is tolerated only for keys the test scheduled.

A SIGKILL can land between the response's header write and its body write, so a client may see a
200 whose body is missing, or an error status with no error in it (botocore then names the error
"400"): that is a cut-off like a reset connection, recognised as such (`CutOffError`) and
tolerated only while the server is being killed. The client may see it before the test has said
so; it waits for the notice. Any other failure of a client thread (a `ClientError` in a targeted
cycle, an assertion, an exception) fails the test with its message.

Cost: HSMBRIDGE_CRASH_CYCLES (default 30: each create and destroy kill point four times, each
store kill point twice, ten random kills) cycles take ~1.6 min on 2 vCPUs (~3 s a cycle: server
start-up, the check, up to 1.5 s of load, a plain restart every fifth), ~2 min beside two CPU
burners. Every CI run draws a new seed, so the runs add up; raise the count for a soak.
HSMBRIDGE_CRASH_SEED replays the choice of kill points, hit counts and delays (request
interleavings under load stay nondeterministic); every failure message carries the seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = [pytest.mark.slow, pytest.mark.softhsm]

CYCLES = int(os.environ.get("HSMBRIDGE_CRASH_CYCLES", "30"))
SEED = int(os.environ.get("HSMBRIDGE_CRASH_SEED", str(random.SystemRandom().randrange(2**32))))
DAY = 86_400.0
# Virtual seconds per wall second: a 7-day waiting period passes in 0.5 s, so the sweeper (every
# 0.2 s) runs final deletions while the test is driving the server.
SPEED = 7 * DAY / 0.5
SWEEP_S = "0.2"
MARKER_TIMEOUT_S = 20.0
# How long a deletion the new server's sweeper is making may keep the store inconsistent.
SETTLE_S = 5.0
SERVE_EVERY = 5  # every 5th restart is plain `hsmbridge serve`, as an operator would run it
CREATE_POINTS = ("before_hsm_create", "after_hsm_create")
DESTROY_POINTS = ("before_hsm_destroy", "after_hsm_destroy")
STORE_POINTS = ("in_connect", "in_disconnect")
# Errors a request may legitimately get while racing the sweeper or a key we scheduled earlier.
EXPECTED_CODES = {"KMSInvalidStateException", "NotFoundException", "DisabledException"}
# How long a client that saw its connection cut may wait for the test to say it killed the server.
KILL_NOTICE_S = 30.0


class CutOffError(Exception):
    """A response that ended early: the server was killed between writing headers and body."""


def _field(response: dict[str, Any], name: str) -> Any:
    if name not in response:
        raise CutOffError(f"response without {name}: {response!r}")
    return response[name]


def _cut_off(exc: ClientError) -> bool:
    """An error response whose body was cut: botocore names the error after the bare HTTP status
    when it finds no JSON `__type` (every error hsmbridge sends has one), with an empty or torn
    message. urllib3 raises instead only if it sees the close before it reads the body."""
    return str(exc.response.get("Error", {}).get("Code", "")).isdigit()


# What a request cut off by SIGKILL looks like to the client.
CONNECTION_LOST = (BotoCoreError, CutOffError)


@dataclass
class Run:
    env: InitEnv
    logs: Path
    rng: random.Random
    offset_days: float = 0.0
    keys: list[str] = field(default_factory=list)  # recent Enabled ARNs the load draws from
    created: set[str] = field(default_factory=set)  # every ARN whose CreateKey answered
    doomed: set[str] = field(default_factory=set)  # ARNs scheduled for deletion
    sealed: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    witness: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # first blob per key
    hits: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    decrypt_checks: int = 0
    final_checks: int = 0
    servers: list[ServerProcess] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, *args: str, plain: bool = False) -> ServerProcess:
        log = self.logs / f"server-{len(self.servers):03d}.log"
        if plain:
            srv = ServerProcess.serve(self.env, log)
        else:
            clock = ("--clock-offset-days", str(self.offset_days), "--clock-speed", str(SPEED))
            srv = ServerProcess.launcher(self.env, log, *clock, "--sweep-interval", SWEEP_S, *args)
        self.servers.append(srv)
        return srv.wait_ready()

    def add_key(self, arn: str) -> None:
        with self.lock:
            self.created.add(arn)
            self.keys.append(arn)

    def add_sealed(self, arn: str, blob: bytes, plaintext: bytes) -> None:
        with self.lock:
            self.sealed.append((arn, blob, plaintext))
            self.witness.setdefault(arn, (blob, plaintext))

    def fail(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(f"{what} (seed {SEED})")

    def advance_clock(self, wall_seconds: float) -> None:
        # The next launcher's clock starts past everything this one scheduled (7-day windows):
        # the virtual clock never goes backwards across restarts.
        self.offset_days += wall_seconds * SPEED / DAY + 31


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    print(f"crash test seed: HSMBRIDGE_CRASH_SEED={SEED}")
    root = tmp_path_factory.mktemp("crash")
    env = init_env(root / "env")
    logs = root / "logs"
    logs.mkdir()
    r = Run(env, logs, random.Random(SEED))
    yield r
    for srv in r.servers:
        srv.kill()


def _create(kms: Any, env: InitEnv) -> str:
    answer = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
    meta = _field(answer, "KeyMetadata")
    return str(meta["Arn"])


def _store_state(kms: Any, env: InitEnv) -> str:
    stores = kms.describe_custom_key_stores(CustomKeyStoreId=env.store_id)["CustomKeyStores"]
    return str(stores[0]["ConnectionState"])


def _ensure_connected(kms: Any, env: InitEnv) -> None:
    if _store_state(kms, env) == "CONNECTED":
        return
    kms.connect_custom_key_store(CustomKeyStoreId=env.store_id)
    deadline = time.monotonic() + 15
    while _store_state(kms, env) != "CONNECTED":
        assert time.monotonic() < deadline, "store did not reconnect"
        time.sleep(0.05)


def _wait_marker(marker: Path, srv: ServerProcess) -> str:
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().endswith("\n"):
            return marker.read_text().split()[1]
        assert srv.proc.poll() is None, f"server died before the kill point:\n{srv.log()}"
        time.sleep(0.01)
    raise AssertionError(f"kill point not reached in {MARKER_TIMEOUT_S} s:\n{srv.log()}")


def _in_background(r: Run, fn: Any, *args: Any) -> threading.Thread:
    """Requests cut off by the kill end with a connection error; that is the point. Anything else
    (a 4xx or 5xx answer, an exception) is a failure the test reports."""

    def body() -> None:
        try:
            fn(*args)
        except CONNECTION_LOST:
            pass
        except Exception as exc:  # every other outcome is reported, never swallowed
            r.fail(f"background {getattr(fn, '__name__', fn)}: {exc!r}")

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _join(r: Run, threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            r.fail(f"client thread {thread.name} still running {timeout} s after the kill")


def _about_doomed(problem: str, doomed: set[str]) -> bool:
    """Does a consistency problem name a key the test scheduled for deletion?"""
    name = problem.rsplit(" ", 2)[-2] if problem.endswith(("DELETING", "CREATING")) else None
    name = name or problem.rsplit(" ", 1)[-1]
    return any(arn == name or arn.endswith("/" + name) for arn in doomed)


def _check_settled(r: Run, context: str, marker: Path | None) -> None:
    """The consistency check once the new server's sweeper has finished what it was doing.

    Recovery runs before the server answers, but its deletion sweeper (every SWEEP_S, on a clock
    where 7 days pass in 0.5 s) starts at once: keys scheduled just before the last kill fall due
    while the check reads the token and then the metadata, and the check sees a deletion half
    done. Such problems, all about keys the test scheduled for deletion, are checked again until
    they settle. When the sweeper has itself reached this server's kill point (its marker is
    written), it stays stopped mid-deletion until the kill: the next restart's recovery and
    check cover that key, and the final check on a plain server sees everything."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        report = r.env.check()
        with r.lock:
            doomed = set(r.doomed)
        sweeping = report.problems and all(_about_doomed(p, doomed) for p in report.problems)
        if not sweeping or time.monotonic() > deadline:
            report.assert_clean(context)
            return
        if marker is not None and marker.exists():
            return
        time.sleep(0.1)


def _verify_after_restart(
    r: Run, srv: ServerProcess, context: str, marker: Path | None = None
) -> None:
    """The audit, the store's state, and a few earlier ciphertexts that must still decrypt."""
    _check_settled(r, context, marker)
    kms = r.env.client(srv.url)
    _ensure_connected(kms, r.env)
    for arn, blob, plaintext in r.rng.sample(r.sealed, min(3, len(r.sealed))):
        if _key_lives(kms, arn, arn in r.doomed, context):
            assert kms.decrypt(CiphertextBlob=blob, KeyId=arn)["Plaintext"] == plaintext, context
            r.decrypt_checks += 1


def _key_lives(kms: Any, arn: str, doomed: bool, context: str) -> bool:
    """True when the key is Enabled. A key the test never scheduled for deletion must be."""
    try:
        state = kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"]
    except kms.exceptions.NotFoundException:
        assert doomed, f"{context}: key lost (NotFound, never scheduled for deletion): {arn}"
        return False
    assert doomed or state == "Enabled", f"{context}: never-scheduled key is {state}: {arn}"
    return bool(state == "Enabled")


def _create_recorded(r: Run, kms: Any) -> None:
    r.add_key(_create(kms, r.env))


def _targeted(r: Run, point: str) -> None:
    """One cycle: drive the server until it blocks at `point`, SIGKILL it there."""
    hit = r.rng.randint(1, 3) if point in CREATE_POINTS + DESTROY_POINTS else 1
    marker = r.logs / f"marker-{len(r.servers):03d}"
    srv = r.start("--crash-at", point, "--crash-hit", str(hit), "--marker", str(marker))
    started = time.monotonic()
    _verify_after_restart(r, srv, f"after restart before {point} (seed {SEED})", marker)
    kms = r.env.client(srv.url, read_timeout=MARKER_TIMEOUT_S + 5)
    store = {"CustomKeyStoreId": r.env.store_id}
    if point in CREATE_POINTS:
        threads = [_in_background(r, _create_recorded, r, kms) for _ in range(hit)]
    elif point in DESTROY_POINTS:
        doomed = [_create(kms, r.env) for _ in range(hit)]
        for arn in doomed:
            with r.lock:
                r.created.add(arn)
                r.doomed.add(arn)
            kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
        threads = []
    elif point == "in_connect":
        kms.disconnect_custom_key_store(**store)
        threads = [_in_background(r, lambda: kms.connect_custom_key_store(**store))]
    else:
        # The kill point is the close of this server's login, made lazily on first use: a server
        # that has served no key yet (the first cycle) has none to close.
        r.add_key(_create(kms, r.env))
        threads = [_in_background(r, lambda: kms.disconnect_custom_key_store(**store))]
    r.hits[_wait_marker(marker, srv)] += 1
    srv.kill()
    _join(r, threads, timeout=15)
    r.advance_clock(time.monotonic() - started)


def _load_client(r: Run, url: str, stop: threading.Event) -> None:
    """Mixed traffic until the kill. A thread that dies reports why instead of vanishing."""
    try:
        _load_loop(r, url, stop)
    except CONNECTION_LOST as exc:
        # The server was killed under us; if the test does not say so soon, it was not.
        if not stop.wait(KILL_NOTICE_S):
            r.fail(f"load client lost its connection while the server was up: {exc!r}")
    except BaseException:
        r.fail("load client died:\n" + traceback.format_exc())


def _load_loop(r: Run, url: str, stop: threading.Event) -> None:
    kms = r.env.client(url, read_timeout=10)
    while not stop.is_set():
        op = r.rng.random()
        with r.lock:
            key = r.rng.choice(r.keys) if r.keys else None
        try:
            if key is None or op < 0.35:
                r.add_key(_create(kms, r.env))
            elif op < 0.75:
                plaintext = os.urandom(32)
                blob = _field(kms.encrypt(KeyId=key, Plaintext=plaintext), "CiphertextBlob")
                r.add_sealed(key, blob, plaintext)
            elif op < 0.85:
                with r.lock:
                    sealed = r.rng.choice(r.sealed) if r.sealed else None
                if sealed is not None:
                    key, blob, plaintext = sealed
                    answer = kms.decrypt(CiphertextBlob=blob, KeyId=key)
                    assert _field(answer, "Plaintext") == plaintext, f"decrypt mismatch: {key}"
            else:
                with r.lock:
                    if key in r.keys:
                        r.keys.remove(key)
                    r.doomed.add(key)
                kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
        except ClientError as exc:
            if _cut_off(exc):
                # Killed between the status line and the body; only the kill notice tells.
                raise CutOffError(f"error response without a body: {exc}") from exc
            code = exc.response["Error"]["Code"]
            with r.lock:
                r.codes[code] += 1
                # A deleted key's ciphertexts no longer decrypt: KMS says InvalidCiphertext.
                gone = code == "InvalidCiphertextException" and key in r.doomed
                if code not in EXPECTED_CODES and not gone and not stop.is_set():
                    r.unexpected.append(f"{code}: {exc} (seed {SEED})")


def _random_kill(r: Run) -> None:
    """One cycle: two client threads mix CreateKey/Encrypt/Decrypt/ScheduleKeyDeletion while the
    sweeper deletes keys; SIGKILL after a random delay."""
    srv = r.start()
    started = time.monotonic()
    _verify_after_restart(r, srv, f"after restart before a random kill (seed {SEED})")
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load_client, args=(r, srv.url, stop), daemon=True)
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    time.sleep(r.rng.uniform(0.05, 1.5))
    srv.kill()
    stop.set()
    _join(r, threads, timeout=15)
    r.advance_clock(time.monotonic() - started)


def _plain_restart(r: Run, context: str) -> None:
    srv = r.start(plain=True)
    _verify_after_restart(r, srv, context)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop ends by that signal.
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()


def _kinds(rng: random.Random, cycles: int) -> Iterator[str]:
    """About a third random kills under load, the rest spread over the kill points; drawn from a
    bag refilled once empty, so every 15 cycles hold every kill point (in a random order)."""
    points = CREATE_POINTS + DESTROY_POINTS + STORE_POINTS
    bag: list[str] = []
    for _ in range(cycles):
        if not bag:
            bag = [*points, *CREATE_POINTS, *DESTROY_POINTS, *["random"] * 5]
            rng.shuffle(bag)
        yield bag.pop()


def test_kill_restart_cycles_leave_no_orphans_and_lose_no_keys(run: Run) -> None:
    points = CREATE_POINTS + DESTROY_POINTS + STORE_POINTS
    begun = time.monotonic()
    for cycle, kind in enumerate(_kinds(run.rng, CYCLES)):
        run.kinds[kind] += 1
        if kind == "random":
            _random_kill(run)
        else:
            _targeted(run, kind)
        if kind == "in_disconnect" or cycle % SERVE_EVERY == SERVE_EVERY - 1:
            _plain_restart(run, f"plain restart after cycle {cycle} ({kind}, seed {SEED})")
        # The load draws from recent keys only; `created` and `witness` keep every key for the
        # final check.
        with run.lock:
            del run.keys[:-20]
            del run.sealed[:-50]
        assert not run.unexpected, run.unexpected[:5]
    _plain_restart(run, f"final restart (seed {SEED})")
    _every_key_survived(run)
    # The operators' own audit must agree with ours (recorded orphans are not findings).
    audit = run.env.production_audit()
    assert audit["findings"] == [], audit
    assert not run.unexpected, run.unexpected[:5]
    if CYCLES >= 15:  # a shorter manual run need not draw every point
        assert set(run.hits) == set(points), f"kill points never reached: {run.hits}"
    assert run.decrypt_checks > 0
    logs = "".join(p.read_text(errors="replace") for p in sorted(run.logs.glob("server-*.log")))
    assert "Traceback" not in logs, logs[logs.find("Traceback") - 2000 :][:6000]
    print(
        json.dumps(
            {
                "seed": SEED,
                "cycles": CYCLES,
                "servers": len(run.servers),
                "kinds": run.kinds,
                "kill_points_hit": run.hits,
                "client_error_codes": run.codes,
                "decrypt_checks": run.decrypt_checks,
                "keys_checked_at_end": run.final_checks,
                "keys_created": len(run.created),
                "seconds": round(time.monotonic() - begun, 1),
            }
        )
    )


def _every_key_survived(r: Run) -> None:
    """Every key whose CreateKey answered and that was never scheduled is Enabled and decrypts
    what it encrypted (or, if it never encrypted anything, encrypts and decrypts now)."""
    srv = r.start(plain=True)
    kms = r.env.client(srv.url)
    context = f"final check (seed {SEED})"
    for arn in sorted(r.created):
        if not _key_lives(kms, arn, arn in r.doomed, context):
            continue
        blob, plaintext = r.witness.get(arn) or (b"", b"")
        if not blob:
            plaintext = os.urandom(16)
            blob = kms.encrypt(KeyId=arn, Plaintext=plaintext)["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob, KeyId=arn)["Plaintext"] == plaintext, arn
        r.final_checks += 1
    assert srv.stop() in (0, -signal.SIGTERM), srv.log()
    assert r.final_checks > 0, context


def _wait_deletion_status(audit_log: Path, arn: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in audit_log.read_text().splitlines():
            event = json.loads(line)
            if event["eventName"] == "DeleteKey" and event["keyArn"] == arn:
                return event["additionalEventData"]["backingKeysDeletionStatus"]
        time.sleep(0.1)
    raise AssertionError(f"no DeleteKey audit event for {arn}")


def test_deletion_while_disconnected_leaves_a_recorded_orphan(
    tmp_path: Path,
) -> None:
    """KMS deletes the key but cannot reach the HSM: the material stays as a documented orphan,
    recorded as a tombstone (material_deleted=False) and a DeleteKey event with FAILURE."""
    env = init_env(tmp_path / "env")
    (tmp_path / "logs").mkdir()
    r = Run(env, tmp_path / "logs", random.Random(SEED))
    try:
        srv = r.start()
        kms = env.client(srv.url)
        arn = _create(kms, env)
        kms.schedule_key_deletion(KeyId=arn, PendingWindowInDays=7)
        kms.disconnect_custom_key_store(CustomKeyStoreId=env.store_id)
        deadline = time.monotonic() + 15
        while kms.list_keys()["Keys"]:
            assert time.monotonic() < deadline, "the sweeper did not delete the key"
            time.sleep(0.1)
        # The audit sink flushes about once a second; the tombstone is the durable record.
        status = _wait_deletion_status(env.root / "audit.jsonl", arn)
        srv.kill()
        report = env.check()
        report.assert_clean("after a deletion while disconnected")
        assert report.recorded_orphans == 1
        assert status[0]["deletionStatus"] == "FAILURE"
    finally:
        for srv in r.servers:
            srv.kill()
