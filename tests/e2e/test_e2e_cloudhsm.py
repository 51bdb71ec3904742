"""The CloudHSM v2 API end to end: boto3's unmodified `cloudhsmv2` client and the real `aws` CLI
against a real server (`create_app` + uvicorn) over a real SoftHSM token, with the static
inventory as the source of truth both the CloudHSM API and KMS read.

The scenario an operator runs: two ACTIVE HSMs in two AZs; delete one and KMS refuses CreateKey
in the store (CloudHsmClusterInvalidConfigurationException: fewer than two AZs); add an HSM in
another AZ of the cluster's SubnetMapping and CreateKey works again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.harness import ACCESS_KEY, ACCOUNT, REGION, SECRET_KEY, KmsEnv
from tests.iam_files import ALLOW_ALL, Iam, Keys, new_keys, write_credentials
from tests.live import Live, start_live

pytestmark = pytest.mark.softhsm

AWS_CLI = Path(sys.executable).parent / "aws"
INVENTORY_SECTION = '[inventory]\nprovider = "static"\npath = "clusters.json"\n'


def _prepare(env: KmsEnv) -> Keys:
    """HSM transitions without delay, and a second principal IAM allows nothing."""
    text = env.config_path.read_text()
    assert INVENTORY_SECTION in text
    env.config_path.write_text(
        text.replace(INVENTORY_SECTION, INVENTORY_SECTION + "hsm_transition_delay_s = 0\n")
    )
    iam = Iam(ACCOUNT)
    tester = iam.user("tester", ALLOW_ALL)
    nobody_arn = iam.user("nobody")
    iam.write(env.root / "iam")
    nobody = new_keys("nobody", nobody_arn)
    write_credentials(
        env.root / "credentials", Keys("default", ACCESS_KEY, SECRET_KEY, tester), nobody
    )
    return nobody


@pytest.fixture
def served(make_kms_env: Callable[..., KmsEnv]) -> Iterator[tuple[Live, Keys]]:
    env = make_kms_env(store=False)
    nobody = _prepare(env)
    live = start_live(env)
    try:
        live.create_store()
        live.connect()
        yield live, nobody
    finally:
        live.close()


def _cloudhsm(live: Live, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    return boto3.client(
        "cloudhsmv2",
        endpoint_url=live.url,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )


def _aws(live: Live, *args: str) -> Any:
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
    if not AWS_CLI.exists():
        pytest.fail("the aws CLI is missing: pip install awscli (it is a test dependency)")
    done = subprocess.run(
        [str(AWS_CLI), "cloudhsmv2", *args, "--endpoint-url", live.url, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else {}


def _cluster(clusters: list[dict[str, Any]], cluster_id: str) -> dict[str, Any]:
    (cluster,) = (c for c in clusters if c["ClusterId"] == cluster_id)
    return cluster


def _create_key_error(live: Live) -> str:
    with pytest.raises(ClientError) as info:
        live.create_key()
    code: str = info.value.response["Error"]["Code"]
    return code


def test_delete_and_create_hsm_drive_kms_quorum(served: tuple[Live, Keys]) -> None:
    live, _ = served
    cluster_id = live.env.cluster_id
    hsm = _cloudhsm(live)

    # Both clients see the same cluster: two ACTIVE HSMs in two different AZs.
    by_cli = _cluster(_aws(live, "describe-clusters")["Clusters"], cluster_id)
    by_boto = _cluster(hsm.describe_clusters()["Clusters"], cluster_id)
    for cluster in (by_cli, by_boto):
        assert [h["State"] for h in cluster["Hsms"]] == ["ACTIVE", "ACTIVE"]
        assert len({h["AvailabilityZone"] for h in cluster["Hsms"]}) == 2
    assert {h["HsmId"] for h in by_cli["Hsms"]} == {h["HsmId"] for h in by_boto["Hsms"]}
    live.create_key()  # the quorum holds

    # The aws CLI deletes one HSM: one AZ left, and KMS says the cluster is misconfigured.
    gone, kept = by_boto["Hsms"]
    deleted = _aws(live, "delete-hsm", "--cluster-id", cluster_id, "--hsm-id", gone["HsmId"])
    assert deleted["HsmId"] == gone["HsmId"]
    left = _cluster(hsm.describe_clusters()["Clusters"], cluster_id)["Hsms"]
    assert [h["HsmId"] for h in left] == [kept["HsmId"]]
    assert _create_key_error(live) == "CloudHsmClusterInvalidConfigurationException"

    # boto3 adds an HSM in another AZ of the cluster's subnet mapping: CreateKey works again.
    other_azs = sorted(set(by_boto["SubnetMapping"]) - {kept["AvailabilityZone"]})
    assert other_azs, by_boto["SubnetMapping"]
    created = hsm.create_hsm(ClusterId=cluster_id, AvailabilityZone=other_azs[0])["Hsm"]
    assert created["AvailabilityZone"] == other_azs[0]
    assert created["ClusterId"] == cluster_id
    now = _cluster(_aws(live, "describe-clusters")["Clusters"], cluster_id)["Hsms"]
    assert sorted(h["State"] for h in now) == ["ACTIVE", "ACTIVE"]
    assert {h["AvailabilityZone"] for h in now} == {kept["AvailabilityZone"], other_azs[0]}
    assert live.create_key()["KeyState"] == "Enabled"

    # Every CloudHSM call left one audit event under CloudHSM's own event source.
    events = [e for e in live.events() if e.get("eventSource") == "cloudhsm.amazonaws.com"]
    names = [e.get("eventName") for e in events]
    assert names.count("DeleteHsm") == 1
    assert names.count("CreateHsm") == 1
    assert names.count("DescribeClusters") >= 4


def test_principal_without_iam_allow_is_denied(served: tuple[Live, Keys]) -> None:
    live, nobody = served
    hsm = _cloudhsm(live, nobody.access_key_id, nobody.secret)
    with pytest.raises(ClientError) as info:
        hsm.describe_clusters()
    assert info.value.response["Error"]["Code"] == "CloudHsmAccessDeniedException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as info:
        hsm.delete_hsm(ClusterId=live.env.cluster_id, HsmId="hsm-abcdefghijk")
    assert info.value.response["Error"]["Code"] == "CloudHsmAccessDeniedException"
    # Nothing changed: the administrator still sees both HSMs.
    cluster = _cluster(_cloudhsm(live).describe_clusters()["Clusters"], live.env.cluster_id)
    assert len(cluster["Hsms"]) == 2
