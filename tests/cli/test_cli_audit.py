"""The CLI writes the audit trail an API call writes: one `audit.jsonl` line per command, acting
as the credentials file's `default` principal (the demo administrator `hsmbridge init` writes).

Runs `hsmbridge init` and every command in subprocesses: init provisions its own SoftHSM token
directory, which the SoftHSM library already loaded in this process could not see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsmbridge.cli.init_cmd import DEFAULT_ACCOUNT
from tests.harness import REPO

pytestmark = pytest.mark.softhsm

DEMO_ADMIN = f"arn:aws:iam::{DEFAULT_ACCOUNT}:user/hsmbridge-admin"
UNKNOWN_STORE = "cks-00000000000000000"


def _hsmbridge(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}  # the demo's own conf
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "hsmbridge", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _trail(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_each_cli_command_writes_one_audit_line_as_the_demo_admin(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    init = _hsmbridge("init", "--data-dir", str(data))
    assert init.returncode == 0, init.stderr
    config, audit = str(data / "hsmbridge.toml"), data / "audit.jsonl"
    seen = len(_trail(audit))  # whatever init itself recorded

    def run(group: str, name: str, *opts: str) -> subprocess.CompletedProcess[str]:
        done = _hsmbridge(group, name, "--config", config, *opts)
        new = _trail(audit)[seen + len(lines) :]
        assert len(new) == 1, (group, name, new)  # one line per command, written by the CLI
        lines.extend(new)
        return done

    lines: list[dict[str, Any]] = []
    describe = run("keystore", "describe")
    assert describe.returncode == 0, describe.stderr
    [store] = json.loads(describe.stdout)["CustomKeyStores"]
    sid = store["CustomKeyStoreId"]
    assert run("keystore", "disconnect", "--custom-key-store-id", sid).returncode == 0
    assert run("keystore", "connect", "--custom-key-store-id", sid).returncode == 0
    create = run("key", "create", "--origin", "AWS_CLOUDHSM", "--custom-key-store-id", sid)
    assert create.returncode == 0, create.stderr
    key = json.loads(create.stdout)["KeyMetadata"]
    failed = run("keystore", "describe", "--custom-key-store-id", UNKNOWN_STORE)
    assert failed.returncode == 2
    assert failed.stderr.startswith("CustomKeyStoreNotFoundException: ")

    assert [(e["eventName"], e["errorCode"]) for e in lines] == [
        ("DescribeCustomKeyStores", None),
        ("DisconnectCustomKeyStore", None),
        ("ConnectCustomKeyStore", None),
        ("CreateKey", None),
        ("DescribeCustomKeyStores", "CustomKeyStoreNotFoundException"),
    ]
    for event in lines:
        assert event["eventType"] == "AwsApiCall"
        assert event["principalArn"] == DEMO_ADMIN
        assert event["sourceIPAddress"] is None  # no network edge
        assert event["requestId"]
    assert len({e["requestId"] for e in lines}) == len(lines)
    assert [e["additionalEventData"]["status"] for e in lines] == [200, 200, 200, 200, 400]
    assert lines[1]["customKeyStoreId"] == lines[2]["customKeyStoreId"] == sid
    assert lines[4]["requestParameters"] == {"CustomKeyStoreId": UNKNOWN_STORE}
    # CreateKey: the service's own event is folded into the command's line, not written twice.
    created = lines[3]
    assert (created["keyArn"], created["customKeyStoreId"]) == (key["Arn"], sid)
    assert created["additionalEventData"]["backingKeyId"] == key["KeyId"]
    assert sum(1 for e in _trail(audit) if e["eventName"] == "CreateKey") == 1
    # Timed like an API call: the key generation's HSM time; a describe makes no HSM call.
    assert created["hsmLatencyMs"] is not None
    assert created["hsmLatencyMs"] > 0
    assert lines[0]["hsmLatencyMs"] is None
