"""The real `aws` CLI (awscli from PyPI) as a subprocess against the real server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import pytest

from tests.harness import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = pytest.mark.softhsm


def _aws(shared, *args: str) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # Nothing from the developer's own AWS setup may leak into the run.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_MAX_ATTEMPTS": "1",
    }
    done = subprocess.run(
        ["aws", "kms", *args, "--endpoint-url", shared.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_aws_cli_key_roundtrip(shared, tmp_path):
    if shutil.which("aws") is None:
        pytest.fail("the aws CLI is missing: pip install awscli (it is a test dependency)")
    created = json.loads(
        _aws(
            shared,
            "create-key",
            "--origin",
            "AWS_CLOUDHSM",
            "--custom-key-store-id",
            shared.store_id,
            "--description",
            "from the aws cli",
        )
    )["KeyMetadata"]
    assert created["Origin"] == "AWS_CLOUDHSM"
    key_id = created["KeyId"]

    described = json.loads(_aws(shared, "describe-key", "--key-id", key_id))["KeyMetadata"]
    assert described["Description"] == "from the aws cli"
    assert described["KeyState"] == "Enabled"

    # AWS CLI v1 sends a plain string blob argument as its raw bytes; fileb:// is unambiguous.
    secret = bytes(range(256)) * 2
    (tmp_path / "plain.bin").write_bytes(secret)
    encrypted = json.loads(
        _aws(
            shared,
            "encrypt",
            "--key-id",
            key_id,
            "--plaintext",
            f"fileb://{tmp_path / 'plain.bin'}",
            "--encryption-context",
            "purpose=cli",
        )
    )
    assert encrypted["KeyId"] == created["Arn"]
    (tmp_path / "blob.bin").write_bytes(base64.b64decode(encrypted["CiphertextBlob"]))

    plaintext_b64 = _aws(
        shared,
        "decrypt",
        "--ciphertext-blob",
        f"fileb://{tmp_path / 'blob.bin'}",
        "--encryption-context",
        "purpose=cli",
        "--output",
        "text",
        "--query",
        "Plaintext",
    )
    assert base64.b64decode(plaintext_b64.strip()) == secret

    scheduled = json.loads(
        _aws(shared, "schedule-key-deletion", "--key-id", key_id, "--pending-window-in-days", "7")
    )
    assert scheduled["KeyState"] == "PendingDeletion"
    assert scheduled["PendingWindowInDays"] == 7
    assert shared.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
