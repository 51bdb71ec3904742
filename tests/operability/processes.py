"""Observing a multi-process `hsmbridge serve` from outside, with nothing from the server's help.

* Which processes exist: the supervisor's worker children (`workers_of`), read from /proc.
* Which process answered a request: `on_new_connection` opens a TCP connection, sends one
  request, reads the answer and, while the connection is still open, finds the server-side socket
  of that connection in /proc/net/tcp and the process holding it in /proc/<pid>/fd. Workers share
  the listening socket, but an accepted connection belongs to the one worker that accepted it.
* What the server logged: `ServerLog` parses the text log format of `hsmbridge.http.logs`.
* A CreateKey interrupted between the HSM call and the commit (`plant_interrupted_create`): the
  intent row written through the production metadata store, the key material made by
  pkcs11-tool in its own process (the pytest process never loads the environment's SoftHSM).

Every wait is bounded.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmbridge import bootstrap
from hsmbridge.config import load_settings
from hsmbridge.model import KeyLifecycle, KeyRecord, KeyState
from tests import pkcs11_tool
from tests.reliability.servers import InitEnv, ServerProcess

# -- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def workers_of(pid: int, expect: int, timeout: float = 30.0) -> list[int]:
    """The supervisor's worker pids (multiprocessing spawn children), once `expect` run."""
    deadline = time.monotonic() + timeout
    while True:
        kids = [k for k in children(pid) if "spawn_main" in cmdline(k)]
        if len(kids) >= expect or time.monotonic() > deadline:
            return kids
        time.sleep(0.1)


def running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Pids still running (not zombies) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# -- which process answered -----------------------------------------------------------------


def _server_socket_inode(server_port: int, client_port: int) -> int | None:
    """Inode of the server side of the loopback connection server_port <-> client_port."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if (
                inode
                and int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                return inode
    return None


def socket_owner(server_port: int, client_port: int, candidates: list[int]) -> int | None:
    """Which of `candidates` holds the server side of the connection (None: none of them)."""
    inode = _server_socket_inode(server_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in candidates:
        try:
            fds = list((Path("/proc") / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:  # closed meanwhile
                continue
    return None


@dataclass
class Answer:
    pid: int | None  # the process that held the server side of the connection
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def on_new_connection(
    port: int,
    candidates: list[int],
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on a new connection: the answer and the pid (of `candidates`) that served it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        # The server keeps the connection open (keep-alive), so its socket is still there.
        client_port = conn.sock.getsockname()[1]
        pid = socket_owner(port, client_port, candidates)
        return Answer(pid, resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def signed_headers(env: InitEnv, port: int, operation: str, body: bytes) -> dict[str, str]:
    """SigV4 headers (botocore's signer) for a KMS JSON request with the env's credentials."""
    request = AWSRequest(
        method="POST",
        url=f"http://127.0.0.1:{port}/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    credentials = Credentials(env.access_key, env.secret_key)
    SigV4Auth(credentials, "kms", load_settings(env.config).region).add_auth(request)
    return dict(request.headers.items())


def kms_on_new_connection(
    env: InitEnv, port: int, candidates: list[int], operation: str, params: dict[str, Any]
) -> Answer:
    body = json.dumps(params).encode()
    headers = signed_headers(env, port, operation, body)
    return on_new_connection(port, candidates, "POST", "/", body=body, headers=headers)


def until_each_answers(
    ask: Any, pids: list[int], times: int = 1, timeout: float = 60.0
) -> dict[int, list[Answer]]:
    """Call `ask()` (one request on a new connection) until each of `pids` answered `times`
    times; returns every answer by pid. The kernel picks the worker, so this may take a few."""
    answers: dict[int, list[Answer]] = {}
    deadline = time.monotonic() + timeout
    while any(len(answers.get(p, [])) < times for p in pids):
        if time.monotonic() > deadline:
            got = {pid: len(a) for pid, a in answers.items()}
            raise AssertionError(f"not every worker of {pids} answered {times}x: {got}")
        answer = ask()
        assert answer.pid is not None, f"no process of {pids} served the connection"
        answers.setdefault(answer.pid, []).append(answer)
    return answers


# -- KMS calls ------------------------------------------------------------------------------


def calls(env: InitEnv, url: str, n: int) -> set[str]:
    """CreateKey, then n Encrypt/Decrypt pairs; returns every response's request id."""
    kms = env.client(url, attempts=3)
    ids: set[str] = set()
    created = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)
    ids.add(created["ResponseMetadata"]["RequestId"])
    key_id = created["KeyMetadata"]["KeyId"]
    for i in range(n):
        # A new connection per call (botocore pools them): lets the kernel pick other workers.
        kms = env.client(url, attempts=3) if i % 5 == 0 else kms
        sealed = kms.encrypt(KeyId=key_id, Plaintext=f"secret {i}".encode())
        opened = kms.decrypt(CiphertextBlob=sealed["CiphertextBlob"])
        assert opened["Plaintext"] == f"secret {i}".encode()
        ids |= {sealed["ResponseMetadata"]["RequestId"], opened["ResponseMetadata"]["RequestId"]}
    return ids


def create_key(env: InitEnv, url: str) -> tuple[str, str]:
    """CreateKey through boto3: (key id, request id)."""
    created = env.client(url, attempts=3).create_key(
        Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id
    )
    return created["KeyMetadata"]["KeyId"], created["ResponseMetadata"]["RequestId"]


def encrypts_by_worker(
    env: InitEnv, srv: ServerProcess, workers: list[int], key_id: str
) -> dict[int, list[Answer]]:
    """Signed Encrypts, each on a new connection, until every worker has served one. The
    supervisor is a candidate too: if it answered, the answer says so."""
    params = {"KeyId": key_id, "Plaintext": base64.b64encode(b"who serves").decode()}

    def encrypt() -> Answer:
        return kms_on_new_connection(env, srv.port, [srv.pid, *workers], "Encrypt", params)

    served = until_each_answers(encrypt, workers)
    assert set(served) == set(workers), f"answered by {set(served)}, workers are {workers}"
    for answers in served.values():
        assert [a.status for a in answers] == [200] * len(answers), [a.body for a in answers]
    return served


def audit_events(env: InitEnv) -> list[dict[str, object]]:
    lines = (env.root / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # a torn or interleaved line fails here


# -- logs -----------------------------------------------------------------------------------

BANNER = "hsmbridge serving the KMS API at "
_TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+) "
    r"\[(?P<request_id>[^\]]*)\] (?P<message>.*)$"
)


@dataclass(frozen=True)
class LogLine:
    index: int  # position in the log file
    logger: str
    request_id: str
    message: str


class ServerLog:
    """The lines of a server log (stdout and stderr of the supervisor and its workers)."""

    def __init__(self, path: Path) -> None:
        self.lines = path.read_text(errors="replace").splitlines()

    @property
    def banner(self) -> int:
        """Index of the banner, which the supervisor prints once recovery is done, before it
        starts any worker: every line above it was written by the supervisor."""
        found = [i for i, line in enumerate(self.lines) if line.startswith(BANNER)]
        assert len(found) == 1, self.lines
        return found[0]

    def records(self, message_start: str) -> list[LogLine]:
        """hsmbridge log records whose message starts with `message_start`."""
        found = []
        for i, line in enumerate(self.lines):
            match = _TEXT_LINE.match(line)
            if match and match["message"].startswith(message_start):
                found.append(LogLine(i, match["logger"], match["request_id"], match["message"]))
        return found


# -- an interrupted CreateKey ---------------------------------------------------------------


def plant_interrupted_create(env: InitEnv) -> KeyRecord:
    """What a process killed inside CreateKey leaves: a CREATING intent row, and an HSM key
    labelled with its ARN. Written while no server runs, or while one runs (then it looks like
    a CreateKey another worker has in flight)."""
    settings = load_settings(env.config)
    meta = bootstrap.open_metadata_store(load_settings(env.config))
    try:
        row = meta.get_key_store(env.store_id)
        assert row is not None
        key_id = str(uuid.uuid4())
        record = KeyRecord(
            key_id=key_id,
            arn=f"arn:aws:kms:{settings.region}:{settings.account_id}:key/{key_id}",
            account_id=settings.account_id,
            region=settings.region,
            custom_key_store_id=env.store_id,
            cluster_id=row.store.cluster_id,
            description="interrupted CreateKey",
            base_state=KeyState.ENABLED,
            creation_date=time.time(),
            policy="",
            lifecycle=KeyLifecycle.CREATING,
        )
        with meta.write():
            meta.put_key(record)
    finally:
        meta.close()
    pkcs11_tool.run(
        env.token_label, env.password,
        "--keygen", "--key-type", "AES:32", "--sensitive",
        "--label", record.arn, "--id", key_id.encode("ascii").hex(),
        softhsm_conf=env.softhsm_conf,
    )  # fmt: skip
    return record


def intent_state(env: InitEnv, record: KeyRecord) -> tuple[KeyLifecycle | None, int]:
    """(the key row's lifecycle or None if it is gone, HSM objects labelled with its ARN)."""
    meta = bootstrap.open_metadata_store(load_settings(env.config))
    try:
        row = meta.get_key(record.key_id)
    finally:
        meta.close()
    labels = pkcs11_tool.secret_key_labels(
        env.token_label, env.password, softhsm_conf=env.softhsm_conf
    )
    return (None if row is None else row.lifecycle), labels[record.arn]
