"""Several hsmbridge instances in front of one token, sharing one real PostgreSQL database.

Each instance is its own server process on its own port, over ONE environment made by
`hsmbridge init --metadata-url postgresql://...` (same configuration, SoftHSM2 token directory,
credentials, audit file): "several instances in front of one cluster". Clients talk to them
over HTTP with boto3, like clients behind a load balancer.

Proves:
* races (`test_races_across_instances_keep_every_rule`, 2 and 3 instances): client threads send
  CreateKey, CreateAlias / UpdateAlias / DeleteAlias of five shared alias names, and
  ScheduleKeyDeletion, each request to a random instance. Only the expected refusals come back
  (AlreadyExists, NotFound, KMSInvalidState; no 5xx, not even on an attempt botocore retried);
  every instance then lists the same aliases, each name once, each naming a key the clients
  made and holding the value of a write that may have been the last; every created key is known
  to every instance in the same state (PendingDeletion exactly when its ScheduleKeyDeletion
  answered), and no instance knows a key nobody was answered for; `hsmbridge audit` and the label
  check are clean (no key without material, no material without a key).
* SIGKILL (`test_sigkill_one_instance_under_load`): three instances under the test launcher on one
  shared virtual clock (20x: the start-up grace of 60 s is 3 s, the stale-intent age of 300 s is
  15 s) with the sweeper every 0.5 s. The first one started holds the once-per-database
  maintenance lock; it is SIGKILLed while blocked between the HSM key generation and the commit of
  a CreateKey, under CreateKey/Encrypt/Decrypt load whose clients retry a failed request on
  another instance. No request to a survivor fails; every answered key still decrypts what it
  encrypted; the dead instance's intent (CREATING row + HSM key) is still there at half the stale
  age (a survivor must not roll back a young intent: it could be a live request) and is rolled
  back by a survivor that took the maintenance lock over, once stale; no answered key is lost, no
  unanswered key appears beyond the requests the kill cut off; the audit is clean.
* PostgreSQL restart (`test_postgres_restart_under_load`): two `hsmbridge serve` instances under
  Encrypt/DescribeKey/CreateAlias load; the session's PostgreSQL server is stopped ("fast") for
  longer than the pool's background reconnection keeps trying (10 s). While it is down every
  request fails fast (within POOL_TIMEOUT_S + slack) with DependencyTimeoutException (503,
  retryable) and none answers 200; once it is back, every instance answers every operation again
  by itself within RECOVER_S, and what was answered before survives.
* SoftHSM2 2.6.1's stale view of the token in a process that just created an object
  (`test_a_key_one_instance_made_works_and_dies_everywhere`), set up deterministically: one
  instance must use a key another just made, and the maintenance holder must destroy a deleted
  key's material it had not seen yet. hsmbridge re-reads the token when a key is not found (the
  profile's `stale_cross_process_view`); without that both fail. Tests 1 and 2 still retry and
  count (and print) a rarer SoftHSM2 glitch (CREATE_GLITCH_* below) instead of failing on it.

Cost: ~1.5-2 min on 2 vCPUs (each race run ~12-20 s, the SIGKILL test ~25-35 s of which 15 s
wait for the stale age, the restart test ~25 s of which 12 s of outage, the stale-view test
~6-15 s); ~3 min with two CPU burners beside it. HSMBRIDGE_INSTANCES_SEED replays the clients'
choices (interleavings stay nondeterministic); failure messages carry it.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from hsmbridge import bootstrap
from hsmbridge.config import load_settings
from hsmbridge.metadata.postgres import POOL_TIMEOUT_S
from hsmbridge.metadata.store import MetadataStore
from hsmbridge.model import KeyLifecycle, KeyRecord
from hsmbridge.service.recovery import STALE_INTENT_S
from tests import pkcs11_tool
from tests.postgres import PostgresServer
from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = [pytest.mark.slow, pytest.mark.softhsm, pytest.mark.postgres]

SEED = int(os.environ.get("HSMBRIDGE_INSTANCES_SEED", str(random.SystemRandom().randrange(2**32))))
ALIASES = [f"alias/race-{i}" for i in range(5)]
CLIENTS = 4
JOIN_S = 60.0  # every client thread ends within this after it is told to stop

# Known defects of SoftHSM2 2.6.1 (Debian's) with several processes on one token, each reproduced
# without hsmbridge by python-pkcs11 processes sharing a token.
# * Stale view: after a process creates an object it ignores the changes other processes made
#   since it last looked, so an instance refused a key another one made
#   (KMSInvalidStateException, "key material not in the cluster"). hsmbridge now re-reads the
#   token before it calls a key missing, so this is no longer tolerated; the switch stays for
#   measuring a build without that.
# * Create glitch: a key being generated while another process touches the token may read back
#   with none of its attributes, or its template be refused. hsmbridge destroys it and answers
#   CreateKey with KMSInternalException (500, retryable); the retried CreateKey succeeds.
STALE_TOKEN_VIEW_TOLERATED = False
STALE_TOKEN_VIEW = "is not in the CloudHSM cluster of its custom key store"
CREATE_GLITCH_TOLERATED = True
CREATE_GLITCHES = (
    "The HSM created a key without the required attributes",  # NonCompliantKeyError
    "The HSM rejected the request",  # MisconfiguredError (CKR_TEMPLATE_INCONSISTENT and kin)
)


def _stale_view(exc: ClientError) -> bool:
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return _code(exc) == "KMSInvalidStateException" and STALE_TOKEN_VIEW in message


def _create_glitch(op: str, code: str, message: str) -> bool:
    """A tolerated CreateKey attempt failure (see CREATE_GLITCH_TOLERATED)."""
    if op.lower().replace("_", "") != "createkey":
        return False
    glitch = code == "KMSInternalException" and message.startswith(CREATE_GLITCHES)
    return CREATE_GLITCH_TOLERATED and glitch


# -- shared helpers ---------------------------------------------------------------------------


def _start_all(servers: list[ServerProcess]) -> None:
    """Wait for processes started together (their start-ups overlap, as in a rollout)."""
    for srv in servers:
        srv.wait_ready()


def _kill_all(servers: list[ServerProcess]) -> None:
    """SIGKILL every one (in `finally`): one that will not die does not spare the others."""
    errors = []
    for srv in servers:
        try:
            srv.kill()
        except Exception as exc:  # raised below, once every server had its turn
            errors.append(exc)
    if errors:
        raise errors[0]


def _stop_all(servers: list[ServerProcess]) -> None:
    for srv in servers:
        assert srv.stop() == 0, srv.log()


def _no_tracebacks(servers: list[ServerProcess]) -> None:
    for srv in servers:
        text = srv.log_path.read_text(errors="replace")
        assert "Traceback" not in text, text[max(0, text.find("Traceback") - 1500) :][:6000]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


@dataclass
class Clients:
    """What client threads found out, behind one lock; a thread's crash is a failure too."""

    codes: Counter[str] = field(default_factory=Counter)  # "Op:outcome", every attempt
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def count(self, what: str) -> None:
        with self.lock:
            self.codes[what] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(f"{what} (HSMBRIDGE_INSTANCES_SEED={SEED})")

    def run(self, bodies: list[Callable[[], None]]) -> list[threading.Thread]:
        def guarded(body: Callable[[], None]) -> None:
            try:
                body()
            except Exception:  # reported, never swallowed
                self.fail(traceback.format_exc())

        threads = [
            threading.Thread(target=guarded, args=(b,), name=f"client-{i}", daemon=True)
            for i, b in enumerate(bodies)
        ]
        for t in threads:
            t.start()
        return threads

    def join(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        deadline = time.monotonic() + JOIN_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.fail(f"{t.name} still running {JOIN_S} s after it was told to stop")

    def assert_clean(self) -> None:
        assert not self.failures, "\n".join(self.failures[:10])


def _record_attempts(kms: Any, clients: Clients) -> Any:
    """Count every HTTP attempt botocore makes (its retries included) by status, so a 5xx that a
    retry hid is still seen."""

    def on_response(response_dict: Any, exception: Any, event_name: str, **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        if response_dict is not None:
            status = int(response_dict.get("status_code", 0))
            clients.count(f"attempt:{op}:{status}")
            if status >= 500:
                body = response_dict.get("body") or b"{}"
                try:
                    error = json.loads(body)
                except ValueError:
                    error = {}
                code = str(error.get("__type", "")).rsplit("#", 1)[-1]
                if _create_glitch(op, code, str(error.get("message", ""))):
                    clients.count(f"glitch:{op}")
                    return
                clients.fail(f"{op}: HTTP {status} on an attempt: {body!r}")
        else:
            clients.count(f"attempt:{op}:{type(exception).__name__}")
            clients.fail(f"{op}: {exception!r} on an attempt")

    kms.meta.events.register("response-received.kms", on_response)
    return kms


def _list_aliases(kms: Any) -> list[tuple[str, str]]:
    out = []
    for page in kms.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 7}):
        out += [(a["AliasName"], a.get("TargetKeyId", "")) for a in page["Aliases"]]
    return [(name, target) for name, target in out if name.startswith("alias/race-")]


def _list_keys(kms: Any) -> set[str]:
    keys = set()
    for page in kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 50}):
        keys |= {k["KeyId"] for k in page["Keys"]}
    return keys


@contextmanager
def _metadata(env: InitEnv) -> Iterator[MetadataStore]:
    """The production metadata store on the environment's database (as another process)."""
    meta = bootstrap.open_metadata_store(load_settings(env.config))
    try:
        yield meta
    finally:
        meta.close()


def _creating(meta: MetadataStore, env: InitEnv) -> dict[str, KeyRecord]:
    """CreateKey intents of the store, by key id."""
    return {r.key_id: r for r in meta.keys_in_store(env.store_id, KeyLifecycle.CREATING)}


def _audit_clean(env: InitEnv, context: str) -> None:
    """Both audits, with every server stopped: `hsmbridge audit` and the label check."""
    report = env.production_audit()
    assert report["findings"] == [], f"{context}: {report}"
    env.check().assert_clean(context)


# -- 1. races ---------------------------------------------------------------------------------

RACE_SECONDS = 4.0
MIN_OPS_PER_CLIENT = 40  # the run covers this many operations per client, however slow
# The refusals a race may legitimately produce, per operation.
RACE_EXPECTED = {
    "CreateKey": set(),
    "CreateAlias": {"AlreadyExistsException", "KMSInvalidStateException"},
    "UpdateAlias": {"NotFoundException", "KMSInvalidStateException"},
    "DeleteAlias": {"NotFoundException"},
    "ScheduleKeyDeletion": {"KMSInvalidStateException"},
}
RACE_WEIGHTS = {  # most alias writes collide on the five names
    "CreateKey": 12,
    "CreateAlias": 35,
    "UpdateAlias": 30,
    "DeleteAlias": 13,
    "ScheduleKeyDeletion": 10,
}


@dataclass
class Race(Clients):
    created: list[str] = field(default_factory=list)  # key ids whose CreateKey answered
    scheduled: set[str] = field(default_factory=set)  # ... whose ScheduleKeyDeletion answered
    # Alias writes that answered: name -> (start, end, target key id or None for a delete).
    writes: dict[str, list[tuple[float, float, str | None]]] = field(default_factory=dict)


def _race_client(race: Race, kmss: list[Any], rng: random.Random, store_id: str) -> None:
    ops, weights = list(RACE_WEIGHTS), list(RACE_WEIGHTS.values())
    done = 0
    deadline = time.monotonic() + RACE_SECONDS
    while done < MIN_OPS_PER_CLIENT or time.monotonic() < deadline:
        with race.lock:
            keys = list(race.created)
        op = "CreateKey" if done == 0 or not keys else rng.choices(ops, weights)[0]
        done += 1
        kms = rng.choice(kmss)
        name, key = rng.choice(ALIASES), rng.choice(keys) if keys else ""
        start = time.monotonic()
        try:
            if op == "CreateKey":
                meta = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)
                with race.lock:
                    race.created.append(meta["KeyMetadata"]["KeyId"])
            elif op == "CreateAlias":
                kms.create_alias(AliasName=name, TargetKeyId=key)
            elif op == "UpdateAlias":
                kms.update_alias(AliasName=name, TargetKeyId=key)
            elif op == "DeleteAlias":
                kms.delete_alias(AliasName=name)
            else:
                kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
        except ClientError as exc:
            code = _code(exc)
            race.count(f"{op}:{code}")
            if code not in RACE_EXPECTED[op]:
                race.fail(f"{op}: unexpected {code} ({_status(exc)}): {exc}")
            continue
        end = time.monotonic()
        race.count(f"{op}:ok")
        with race.lock:
            if op == "ScheduleKeyDeletion":
                race.scheduled.add(key)
            elif op != "CreateKey":
                target = None if op == "DeleteAlias" else key
                race.writes.setdefault(name, []).append((start, end, target))


def _may_be_last(writes: list[tuple[float, float, str | None]]) -> set[str | None]:
    """The values a name may hold at the end: those of writes no other write started after the
    end of (by the clients' clocks, one system-wide monotonic clock); none at all: absent."""
    if not writes:
        return {None}
    return {value for s, e, value in writes if not any(s2 > e for s2, _e2, _v in writes)}


@pytest.mark.parametrize("instances", [2, 3])
def test_races_across_instances_keep_every_rule(
    instances: int, postgres_url: str, tmp_path: Path
) -> None:
    env = init_env(tmp_path / "env", postgres_url)
    servers: list[ServerProcess] = []
    race = Race()
    try:
        for i in range(instances):
            servers.append(ServerProcess.serve(env, tmp_path / f"server-{i}.log", "--workers", "1"))
        _start_all(servers)
        rng = random.Random(SEED)
        bodies = []
        for _ in range(CLIENTS):
            kmss = [_record_attempts(env.client(s.url, attempts=3), race) for s in servers]
            crng = random.Random(rng.getrandbits(64))
            bodies.append(lambda k=kmss, r=crng: _race_client(race, k, r, env.store_id))
        race.join(race.run(bodies))
        race.assert_clean()
        checkers = [_record_attempts(env.client(s.url, attempts=3), race) for s in servers]

        # Aliases: one view through every instance, each name once, on a created key, holding
        # the value of a write that may have been the last one.
        views = [_list_aliases(kms) for kms in checkers]
        for view in views[1:]:
            assert view == views[0], f"instances disagree on the aliases: {views}"
        names = [name for name, _target in views[0]]
        assert len(names) == len(set(names)), f"duplicate alias: {views[0]}"
        final = dict(views[0])
        created = set(race.created)
        for name in ALIASES:
            value = final.get(name)
            assert value is None or value in created, f"{name} -> unknown key {value}"
            allowed = _may_be_last(race.writes.get(name, []))
            assert value in allowed, f"{name} -> {value}; could be last: {allowed}"

        # Keys: every instance knows exactly the created keys, each in the state the answered
        # requests put it in (KMS keeps an alias on a key scheduled for deletion).
        assert len(race.created) == len(created), "a key id was answered twice"
        for kms in checkers:
            assert _list_keys(kms) == created
        for key in sorted(created):
            want = "PendingDeletion" if key in race.scheduled else "Enabled"
            states = [kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] for kms in checkers]
            assert states == [want] * instances, f"{key}: {states}, expected {want}"
        for name, target in final.items():
            for kms in checkers:
                assert kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == target

        _stop_all(servers)
        _audit_clean(env, f"after the race of {instances} instances")
        _no_tracebacks(servers)
        race.assert_clean()  # the checks' own attempts
        for op in RACE_EXPECTED:  # the run did race: each operation got through
            assert race.codes[f"{op}:ok"] > 0, race.codes
        assert race.codes["CreateAlias:AlreadyExistsException"] > 0, race.codes
        print(
            f"{instances} instances: {len(created)} keys, {len(race.scheduled)} scheduled, "
            f"aliases {final}; outcomes {dict(sorted(race.codes.items()))}"
        )
    finally:
        race.stop.set()
        _kill_all(servers)


# -- 2. SIGKILL one instance under load -----------------------------------------------------

SPEED = 20.0  # virtual seconds per second: grace 60 s -> 3 s, stale age 300 s -> 15 s
SWEEP_S = 0.5
CRASH_HIT = 6  # the victim blocks in its 6th CreateKey, after some load went through it
MARKER_TIMEOUT_S = 30.0
AFTER_KILL_S = 3.0  # load that goes on after the kill, on the survivors
TRIES = 4  # a client tries a request on up to this many instances (in turn)
READ_TIMEOUT_S = 20.0  # a request blocked in the victim ends when it is killed (< 1 s)


@dataclass
class Load(Clients):
    victim: str = ""
    killed_at: float = float("inf")  # time.monotonic() of the SIGKILL
    keys: dict[str, str] = field(default_factory=dict)  # answered key id -> instance that made it
    sealed: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    failed: list[tuple[str, str, str, float, float]] = field(default_factory=list)
    stale: Counter[str] = field(default_factory=Counter)  # STALE_TOKEN_VIEW refusals per op
    glitches: int = 0  # CREATE_GLITCHES answers
    served: Counter[str] = field(default_factory=Counter)  # answered requests per instance
    served_after_kill: Counter[str] = field(default_factory=Counter)
    cut_creates: int = 0  # CreateKeys that got no answer (a key may exist nobody was told of)


class LostAnswerError(Exception):
    """A response that ended early: the instance died while writing it."""


def _need(answer: dict[str, Any], name: str) -> Any:
    if name not in answer:
        raise LostAnswerError(f"response without {name}: {answer!r}")
    return answer[name]


def _retrying(load: Load, urls: list[str], kmss: dict[str, Any], rng: random.Random) -> Any:
    """`call(op, key, **kwargs)`: one request, sent to a random instance and on failure to the
    next one, as a client behind a load balancer retries: connection errors, cut-off answers and
    5xx are retried (and recorded); any other error fails the test (but see
    STALE_TOKEN_VIEW_TOLERATED). Returns (answer, url of the instance that answered)."""

    def call(op: str, key: str | None, **kwargs: Any) -> tuple[dict[str, Any], str]:
        first = rng.randrange(len(urls))
        for i in range(TRIES):
            url = urls[(first + i) % len(urls)]
            start = time.monotonic()
            try:
                answer: dict[str, Any] = getattr(kmss[url], op)(**kwargs)
                check = {"create_key": "KeyMetadata", "encrypt": "CiphertextBlob"}
                _need(answer, check.get(op, "KeyId"))
            except (BotoCoreError, LostAnswerError, ClientError) as exc:
                end = time.monotonic()
                what = type(exc).__name__
                if isinstance(exc, ClientError):
                    what = f"{_code(exc)}/{_status(exc)}"
                    message = str(exc.response.get("Error", {}).get("Message", ""))
                    if _create_glitch(op, _code(exc), message):
                        with load.lock:
                            load.glitches += 1
                        continue
                    if _status(exc) < 500 and not _code(exc).isdigit():
                        with load.lock:
                            maker = load.keys.get(key or "")
                        if STALE_TOKEN_VIEW_TOLERATED and _stale_view(exc) and maker != url:
                            with load.lock:
                                load.stale[op] += 1
                            continue
                        raise  # a client error is never what a kill should cause
                with load.lock:
                    load.failed.append((url, op, what, start, end))
                    if op == "create_key" and url == load.victim and start < load.killed_at:
                        load.cut_creates += 1
                continue
            with load.lock:
                load.served[url] += 1
                if start > load.killed_at:
                    load.served_after_kill[url] += 1
            return answer, url
        raise AssertionError(f"{op} failed on {TRIES} instances in turn")

    return call


def _load_client(load: Load, call: Any, rng: random.Random, store_id: str) -> None:
    mine: list[str] = []
    while not load.stop.is_set():
        if not mine or rng.random() < 0.3:
            answer, url = call("create_key", None, Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)
            key = answer["KeyMetadata"]["KeyId"]
            mine.append(key)
            with load.lock:
                twice = key in load.keys
                load.keys[key] = url
            if twice:
                load.fail(f"CreateKey answered {key} twice")
            continue
        key = rng.choice(mine)
        plaintext = rng.randbytes(rng.randint(1, 64))
        blob = call("encrypt", key, KeyId=key, Plaintext=plaintext)[0]["CiphertextBlob"]
        with load.lock:
            load.sealed.append((key, blob, plaintext))
        got = call("decrypt", key, CiphertextBlob=blob, KeyId=key)[0]
        if got.get("Plaintext") != plaintext:
            load.fail(f"Decrypt of a fresh ciphertext under {key} gave {got!r}")


def _maintenance_holders(url: str) -> list[int]:
    """PostgreSQL backend pids of the connections holding the maintenance lock in the database."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'hsmbridge-maintenance' AND datname = current_database()"
        ).fetchall()
    return sorted(int(r[0]) for r in rows)


def _wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float) -> float:
    """Poll until `predicate()` is true; returns the time.monotonic() it first was."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)


def _labels(env: InitEnv) -> Counter[str]:
    return Counter(
        pkcs11_tool.secret_key_labels(env.token_label, env.password, softhsm_conf=env.softhsm_conf)
    )


def test_sigkill_one_instance_under_load(postgres_url: str, tmp_path: Path) -> None:
    env = init_env(tmp_path / "env", postgres_url)
    wall0, mono0 = time.time(), time.monotonic()

    def virtual_now() -> float:  # the instances' shared clock
        return wall0 + (time.monotonic() - mono0) * SPEED

    clock = ["--clock-speed", str(SPEED), "--sweep-interval", str(SWEEP_S)]
    clock += ["--clock-start-wall", repr(wall0), "--clock-start-mono", repr(mono0)]
    marker = tmp_path / "marker"
    crash = ["--crash-at", "after_hsm_create", "--crash-hit", str(CRASH_HIT), "--marker"]
    servers: list[ServerProcess] = []
    load = Load()
    try:
        # The victim starts alone, so it takes the maintenance lock: its death hands it over.
        victim = ServerProcess.launcher(env, tmp_path / "victim.log", *clock, *crash, str(marker))
        servers.append(victim)
        victim.wait_ready()
        (held_by_victim,) = _maintenance_holders(postgres_url)
        survivors = [
            ServerProcess.launcher(env, tmp_path / f"survivor-{i}.log", *clock) for i in range(2)
        ]
        servers += survivors
        _start_all(survivors)
        load.victim = victim.url
        urls = [s.url for s in servers]
        rng = random.Random(SEED)
        bodies = []
        for _ in range(CLIENTS):
            kmss = {u: env.client(u, attempts=1, read_timeout=READ_TIMEOUT_S) for u in urls}
            crng = random.Random(rng.getrandbits(64))
            call = _retrying(load, urls, kmss, crng)
            bodies.append(lambda c=call, r=crng: _load_client(load, c, r, env.store_id))
        threads = load.run(bodies)

        _wait_for(  # or a client's failure, reported at once
            "victim blocked in a CreateKey",
            lambda: marker.exists() or load.failures,
            MARKER_TIMEOUT_S,
            0.01,
        )
        load.assert_clean()
        assert victim.proc.poll() is None, victim.log()
        with load.lock:
            load.killed_at = time.monotonic()
        victim.kill()
        with _metadata(env) as meta:
            in_flight = _creating(meta, env)
            time.sleep(AFTER_KILL_S)
            load.join(threads)
            load.assert_clean()
            # With no request in flight any more, the intents left are the dead instance's; it
            # wrote them before it died.
            dead = _creating(meta, env)
            assert dead, f"no intent left by the killed instance (in flight: {in_flight})"
            assert set(dead) <= set(in_flight), (dead, in_flight)

            # Young intents are spared: at half the stale age they and their material remain.
            oldest = min(r.creation_date for r in dead.values())
            half = oldest + STALE_INTENT_S / 2
            _wait_for("half the stale age", lambda: virtual_now() >= half, 30.0, 0.05)
            assert set(dead) <= set(_creating(meta, env)), "a young intent was rolled back"
            labels = _labels(env)
            assert any(labels[r.arn] == 1 for r in dead.values()), "the blocked one has no key"

            # Once stale, a survivor (the new maintenance holder) rolls every one back.
            budget = (STALE_INTENT_S / SPEED) + 10 * SWEEP_S + 10.0
            gone_at = _wait_for(
                "the dead instance's intents rolled back",
                lambda: not set(dead) & set(_creating(meta, env)),
                budget,
                0.1,
            )
            youngest = max(r.creation_date for r in dead.values())
            age_at_rollback = wall0 + (gone_at - mono0) * SPEED - youngest
            assert age_at_rollback >= STALE_INTENT_S, age_at_rollback
            assert not _creating(meta, env), "an intent is left behind"
            assert all(meta.get_key(k) is None for k in dead)
        holders = _maintenance_holders(postgres_url)
        assert len(holders) == 1, holders
        assert holders[0] != held_by_victim, holders

        # Every failure was the victim's, caused by the kill; the survivors kept serving.
        with load.lock:
            failures = list(load.failed)
        logs = {s.url: s for s in servers}
        before = [f for f in failures if f[4] < load.killed_at]
        assert not before, f"failed before the kill: {before[:5]}\n{logs[before[0][0]].log()}"
        on_survivors = [f for f in failures if f[0] != victim.url]
        assert not on_survivors, f"failed: {on_survivors[:5]}\n{logs[on_survivors[0][0]].log()}"
        for srv in survivors:
            assert load.served_after_kill[srv.url] > 0, load.served_after_kill

        # No answered key lost, none answered twice, none made behind the clients' backs beyond
        # the CreateKeys the kill cut off; every ciphertext still decrypts, through each survivor.
        checkers = {s.url: env.client(s.url, attempts=3) for s in survivors}
        for kms in checkers.values():
            listed = _list_keys(kms)
            assert set(load.keys) <= listed, set(load.keys) - listed
            assert not listed & set(dead)
            unanswered = listed - set(load.keys)
            assert len(unanswered) <= load.cut_creates, (unanswered, load.cut_creates)
            for key in load.keys:
                assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled", key
        stale_at_end = 0
        for key, blob, plaintext in load.sealed:
            opened = 0
            for url, kms in checkers.items():
                try:
                    got = kms.decrypt(CiphertextBlob=blob, KeyId=key)["Plaintext"]
                except ClientError as exc:
                    maker = load.keys[key]
                    if not (STALE_TOKEN_VIEW_TOLERATED and _stale_view(exc) and maker != url):
                        raise
                    stale_at_end += 1
                    continue
                assert got == plaintext, key
                opened += 1
            assert opened, f"no survivor decrypts under {key}"

        _stop_all(survivors)
        _audit_clean(env, "after SIGKILL of one of three instances")
        _no_tracebacks(survivors)
        print(
            f"{len(load.keys)} keys, {len(load.sealed)} ciphertexts; dead instance's intents "
            f"{len(dead)} (in flight at the kill: {len(in_flight)}), rolled back at virtual age "
            f"{age_at_rollback:.0f} s; served {dict(load.served)}, after the kill "
            f"{dict(load.served_after_kill)}; {len(failures)} failed attempts on the victim, "
            f"{load.cut_creates} CreateKeys cut off; refused for a stale token view (SoftHSM2): "
            f"{dict(load.stale)} under load, {stale_at_end} of the final decrypts; CreateKey "
            f"glitches (SoftHSM2): {load.glitches}"
        )
    finally:
        load.stop.set()
        _kill_all(servers)


# -- 3. PostgreSQL restart under load --------------------------------------------------------

DOWN_S = 12.0  # longer than the pool's background reconnection tries (10 s)
FAIL_FAST_S = POOL_TIMEOUT_S + 3.0  # the pool's wait, plus slack for a busy machine
RECOVER_S = 20.0
RETRYABLE_WHILE_DOWN = {"DependencyTimeoutException"}  # 503: every SDK retries it


@dataclass
class Outage(Clients):
    # (url, op, start, end, outcome): outcome "ok" or the error code / exception name.
    calls: list[tuple[str, str, float, float, str]] = field(default_factory=list)
    sealed: list[tuple[bytes, bytes]] = field(default_factory=list)
    aliases: set[str] = field(default_factory=set)  # CreateAlias answered, DeleteAlias did not
    deleted: set[str] = field(default_factory=set)  # DeleteAlias answered
    names: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)))


OUTAGE_OPS = ("Encrypt", "DescribeKey", "CreateAlias", "DeleteAlias")


def _outage_client(
    out: Outage, kms: Any, rng: random.Random, *, url: str, key: str, tag: int
) -> None:
    """Encrypt, DescribeKey and alias writes (a client's own names: created, then deleted, so
    the key's 50-alias quota is never reached) on one instance, one attempt each."""
    live: list[str] = []  # this client's aliases whose CreateAlias answered
    while not out.stop.is_set():
        op = rng.choice(["Encrypt", "DescribeKey", "Alias"])
        if op == "Alias":
            op = "CreateAlias" if len(live) < 3 else "DeleteAlias"
        plaintext = rng.randbytes(16)
        with out.lock:
            name = f"alias/outage-{tag}-{next(out.names)}"
        start = time.monotonic()
        try:
            if op == "Encrypt":
                blob = kms.encrypt(KeyId=key, Plaintext=plaintext)["CiphertextBlob"]
                with out.lock:
                    out.sealed.append((blob, plaintext))
            elif op == "DescribeKey":
                got = kms.describe_key(KeyId=key)["KeyMetadata"]
                if got["KeyId"] != key or got["KeyState"] != "Enabled":
                    out.fail(f"DescribeKey answered {got}")
            elif op == "CreateAlias":
                kms.create_alias(AliasName=name, TargetKeyId=key)
                live.append(name)
                with out.lock:
                    out.aliases.add(name)
            else:
                # A failed delete may have committed: that name is never asked about again.
                name = live.pop(0)
                with out.lock:
                    out.aliases.discard(name)
                kms.delete_alias(AliasName=name)
                with out.lock:
                    out.deleted.add(name)
            outcome = "ok"
        except ClientError as exc:
            outcome = f"{_code(exc)}/{_status(exc)}"
        except BotoCoreError as exc:
            outcome = type(exc).__name__
        end = time.monotonic()
        with out.lock:
            out.calls.append((url, op, start, end, outcome))
        out.count(f"{op}:{outcome}")
        if outcome != "ok":
            time.sleep(0.05)  # a client backs off a little


def _recovered(out: Outage, urls: list[str], since: float) -> bool:
    """Every instance answered every operation since `since`."""
    with out.lock:
        ok = {(u, op) for u, op, s, _e, o in out.calls if s >= since and o == "ok"}
    return all((u, op) in ok for u in urls for op in OUTAGE_OPS)


def test_postgres_restart_under_load(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    env = init_env(tmp_path / "env", postgres_url)
    servers: list[ServerProcess] = []
    out = Outage()
    running = True
    try:
        for i in range(2):
            servers.append(ServerProcess.serve(env, tmp_path / f"server-{i}.log", "--workers", "1"))
        _start_all(servers)
        urls = [s.url for s in servers]
        key = env.client(urls[0]).create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
        key_id = key["KeyMetadata"]["KeyId"]
        rng = random.Random(SEED)
        bodies = []
        for tag in range(CLIENTS):
            # Two clients per instance, so each has requests wholly inside the outage. One
            # attempt each: the test sees every answer as it comes, and how long it took.
            url = urls[tag % len(urls)]
            kms = env.client(url, attempts=1, read_timeout=30)
            crng = random.Random(rng.getrandbits(64))
            bodies.append(
                lambda u=url, k=kms, r=crng, t=tag: _outage_client(
                    out, k, r, url=u, key=key_id, tag=t
                )
            )
        threads = out.run(bodies)
        time.sleep(1.5)

        stopping = time.monotonic()
        running = False  # from here on `finally` starts it again, whatever happens
        postgres_server.stop("fast")
        stopped = time.monotonic()
        time.sleep(DOWN_S)
        starting = time.monotonic()
        postgres_server.start()
        running = True
        up = time.monotonic()
        try:
            recovered = _wait_for(
                "every instance answers every operation again",
                lambda: _recovered(out, urls, up),
                RECOVER_S,
                0.1,
            )
        except AssertionError:
            with out.lock:
                since = Counter(f"{u[-5:]} {op} {o}" for u, op, s, _e, o in out.calls if s >= up)
            raise AssertionError(f"after PostgreSQL came back: {dict(since)}") from None
        out.join(threads)
        out.assert_clean()

        with out.lock:
            calls = list(out.calls)
        before = [c for c in calls if c[3] < stopping and c[4] != "ok"]
        assert not before, f"failed before the outage: {before[:5]}"
        while_down = [c for c in calls if c[2] >= stopped and c[3] <= starting]
        assert {c[0] for c in while_down} == set(urls), f"an instance had no request: {calls}"
        for url, op, start, end, outcome in while_down:
            assert outcome.split("/")[0] in RETRYABLE_WHILE_DOWN, (url, op, outcome)
            assert end - start <= FAIL_FAST_S, f"{op} took {end - start:.1f} s to fail"
        # Around the transitions a request may still get through or fail retryably; nothing
        # else, and nothing hangs.
        for url, op, start, end, outcome in calls:
            code = outcome.split("/")[0]
            assert outcome == "ok" or code in RETRYABLE_WHILE_DOWN, (url, op, outcome)
            assert end - start <= FAIL_FAST_S, f"{op} took {end - start:.1f} s"

        # Whatever was answered survived the restart, through both instances.
        checkers = [env.client(u, attempts=3) for u in urls]
        for i, (blob, plaintext) in enumerate(out.sealed):
            assert checkers[i % 2].decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
        for kms in checkers:
            names = set()
            for page in kms.get_paginator("list_aliases").paginate():
                names |= {a["AliasName"] for a in page["Aliases"]}
            assert out.aliases <= names, out.aliases - names
            assert not out.deleted & names, out.deleted & names

        _stop_all(servers)
        _audit_clean(env, "after a PostgreSQL restart under load")
        _no_tracebacks(servers)
        slowest = max(end - start for _u, _op, start, end, _o in while_down)
        print(
            f"down {starting - stopped:.1f} s: {len(while_down)} requests failed, slowest "
            f"{slowest:.1f} s; all answering {recovered - up:.1f} s after PostgreSQL was back; "
            f"outcomes {dict(sorted(out.codes.items()))}"
        )
    finally:
        out.stop.set()
        _kill_all(servers)
        if not running:
            postgres_server.start()  # the session's other tests need it, with their databases


# -- 4. one process's stale view of the SoftHSM2 token ----------------------------------------


class StaleTokenViewError(AssertionError):
    """What SoftHSM2's stale view causes when hsmbridge does not re-read the token."""


def test_a_key_one_instance_made_works_and_dies_everywhere(
    postgres_url: str, tmp_path: Path
) -> None:
    """Deterministic: instance H looks at the token, O makes key X, H makes key Y; then H must
    encrypt under X, and H, the maintenance holder, must destroy X's material when X's deletion
    is due. D (its clock 8 days behind) schedules the deletion, so it is due at once for H while no
    clock runs fast enough to roll back a CreateKey in flight."""
    env = init_env(tmp_path / "env", postgres_url)
    servers: list[ServerProcess] = []
    try:
        holder = ServerProcess.launcher(env, tmp_path / "h.log", "--sweep-interval", "0.3")
        servers.append(holder)
        holder.wait_ready()  # alone: it takes the maintenance lock
        other = ServerProcess.serve(env, tmp_path / "o.log", "--workers", "1")
        behind = ServerProcess.launcher(env, tmp_path / "d.log", "--clock-offset-days", "-8")
        servers += [other, behind]
        _start_all(servers[1:])
        h, o, d = (env.client(s.url, attempts=1) for s in (holder, other, behind))

        def make(kms: Any) -> str:
            meta = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
            return str(meta["KeyMetadata"]["KeyId"])

        h.encrypt(KeyId=make(o), Plaintext=b"look")  # H has looked at the token
        x = make(o)
        make(h)
        problems = []
        try:
            h.encrypt(KeyId=x, Plaintext=b"x")
        except ClientError as exc:
            problems.append(f"H refuses a key O made: {_code(exc)}: {exc}")
        d.schedule_key_deletion(KeyId=x, PendingWindowInDays=7)

        def deleted() -> bool:
            try:
                o.describe_key(KeyId=x)
            except o.exceptions.NotFoundException:
                return True
            return False

        _wait_for("the due deletion", deleted, 15.0, 0.1)
        _stop_all(servers)
        problems += env.check().problems  # e.g. "deleted key's material still present"
        if problems:
            raise StaleTokenViewError("\n".join(problems))
    finally:
        _kill_all(servers)
