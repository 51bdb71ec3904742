"""`pytest -m staging`: the end-to-end path against a real CloudHSM cluster.

Described by environment variables; without them every test here is skipped (the whole suite
runs it as a skip):
  HSMBRIDGE_STAGING_CONFIG          hsmbridge.toml for the cluster (profile `cloudhsm`); its data
                                    directory holds the credentials file the clients use
  HSMBRIDGE_STAGING_PASSWORD_FILE   kmsuser's current password (one line, 0600)
  HSMBRIDGE_STAGING_TRUST_ANCHOR    the cluster's trust anchor certificate (customerCA.crt)
  HSMBRIDGE_STAGING_CLUSTER_ID      optional: the cluster, when the configuration has several
  HSMBRIDGE_STAGING_CONNECT_TIMEOUT optional: seconds to wait for CONNECTED (default 300)
The run needs a cluster with no custom key store in that configuration's metadata. It serves
the configuration with `hsmbridge serve`, creates a custom key store with boto3, connects it
(which rotates kmsuser's password: run the officer's reset before the next run), creates a key,
encrypts, decrypts, makes a data key, checks a tampered ciphertext is refused, schedules the key
for deletion (7 days), and disconnects. What it leaves is printed.
"""

from __future__ import annotations

import configparser
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmbridge.config import load_settings
from tests.reliability.servers import reserve_port

pytestmark = pytest.mark.staging

REQUIRED = (
    "HSMBRIDGE_STAGING_CONFIG",
    "HSMBRIDGE_STAGING_PASSWORD_FILE",
    "HSMBRIDGE_STAGING_TRUST_ANCHOR",
)


@dataclass
class Staging:
    config: Path
    password: str
    anchor: str
    cluster_id: str
    connect_timeout_s: float


@pytest.fixture(scope="module")
def staging() -> Staging:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        pytest.skip(f"no staging cluster described: set {', '.join(missing)}")
    config = Path(os.environ["HSMBRIDGE_STAGING_CONFIG"]).resolve()
    settings = load_settings(config)
    cluster_id = os.environ.get("HSMBRIDGE_STAGING_CLUSTER_ID") or ""
    if not cluster_id:
        (cluster_id,) = settings.clusters  # several clusters: name one
    return Staging(
        config=config,
        password=Path(os.environ["HSMBRIDGE_STAGING_PASSWORD_FILE"]).read_text().strip(),
        anchor=Path(os.environ["HSMBRIDGE_STAGING_TRUST_ANCHOR"]).read_text(),
        cluster_id=cluster_id,
        connect_timeout_s=float(os.environ.get("HSMBRIDGE_STAGING_CONNECT_TIMEOUT", "300")),
    )


@pytest.fixture(scope="module")
def kms(staging: Staging, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with served(staging, tmp_path_factory.mktemp("staging") / "server.log") as client:
        yield client


@contextmanager
def served(staging: Staging, log: Path) -> Iterator[Any]:
    """`hsmbridge serve` on the staging configuration, and a boto3 KMS client for it."""
    settings = load_settings(staging.config)
    reservation = reserve_port()
    port = reservation.getsockname()[1]
    argv = [sys.executable, "-m", "hsmbridge", "serve", "--config", str(staging.config)]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*argv, "--port", str(port), "--workers", "1"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_listening(port, server, log)
        reservation.close()
        creds = configparser.ConfigParser()
        creds.read(settings.credentials_file)
        section = creds[settings.cli_profile]
        yield boto3.client(
            "kms",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name=settings.region,
            aws_access_key_id=section["aws_access_key_id"],
            aws_secret_access_key=section["aws_secret_access_key"],
            config=Config(retries={"mode": "standard", "total_max_attempts": 3}),
        )
    finally:
        reservation.close()
        server.terminate()
        server.wait(timeout=30)
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


def _wait_listening(port: int, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"hsmbridge serve exited:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"hsmbridge serve did not listen:\n{log.read_text()[-3000:]}")


def test_a_store_on_the_cluster_from_creation_to_disconnect(staging: Staging, kms: Any) -> None:
    print(exercise(staging, kms))


def exercise(staging: Staging, kms: Any) -> str:
    """The staging path on a served configuration; returns what it left, in one line."""
    name = f"hsmbridge-staging-{uuid.uuid4().hex[:8]}"
    store_id = kms.create_custom_key_store(
        CustomKeyStoreName=name,
        CloudHsmClusterId=staging.cluster_id,
        TrustAnchorCertificate=staging.anchor,
        KeyStorePassword=staging.password,
    )["CustomKeyStoreId"]
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    deadline = time.monotonic() + staging.connect_timeout_s
    while True:
        store = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0]
        if store["ConnectionState"] in ("CONNECTED", "FAILED"):
            break
        assert time.monotonic() < deadline, f"still {store['ConnectionState']}"
        time.sleep(1)
    assert store["ConnectionState"] == "CONNECTED", store.get("ConnectionErrorCode")
    key = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store_id)["KeyMetadata"]
    context = {"run": name}
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"staging", EncryptionContext=context)
    plain = kms.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext=context)
    assert plain["Plaintext"] == b"staging"
    assert len(kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")["Plaintext"]) == 32
    tampered = bytearray(blob["CiphertextBlob"])
    tampered[-1] ^= 1
    with pytest.raises(ClientError) as refused:
        kms.decrypt(CiphertextBlob=bytes(tampered), EncryptionContext=context)
    assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    return (
        f"left: custom key store {store_id} ({name}), DISCONNECTED, with key {key['KeyId']} "
        "pending deletion; kmsuser's password was rotated at connect"
    )
