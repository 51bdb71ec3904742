"""Cluster inventories: the describe-clusters file (re-read per call) and the cloudhsmv2 adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import boto3
import botocore.exceptions
import pytest

from hsmbridge.config import InventorySettings
from hsmbridge.errors import ConfigError
from hsmbridge.keystore.inventory import (
    CloudHsmInventory,
    ClusterInfo,
    HsmInfo,
    InventoryUnavailableError,
    StaticInventory,
    inventory_from_settings,
)
from hsmbridge.keystore.quorum import Operation, Reason, check

REGION = "us-east-1"


# --- StaticInventory -----------------------------------------------------------------------------


def test_static_describes_the_demo_cluster(
    inventory_file, demo_document, demo_cluster_id, demo_pki
):
    info = StaticInventory(inventory_file(demo_document)).describe(demo_cluster_id)
    assert isinstance(info, ClusterInfo)
    assert info.cluster_id == demo_cluster_id
    assert info.state == "ACTIVE"
    assert [(h.availability_zone, h.state) for h in info.hsms] == [
        ("us-east-1a", "ACTIVE"),
        ("us-east-1b", "ACTIVE"),
    ]
    assert all(isinstance(h, HsmInfo) and h.subnet_id and h.eni_ip for h in info.hsms)
    assert set(info.subnet_mapping) == {"us-east-1a", "us-east-1b"}
    assert info.cluster_certificate_pem == demo_pki.cluster_cert_pem
    assert info.hsm_type == "hsm2m.medium"
    assert info.vpc_id.startswith("vpc-")
    assert check(Operation.CREATE_KEY, info).ok


def test_static_unknown_cluster_is_none(inventory_file, demo_document):
    assert StaticInventory(inventory_file(demo_document)).describe("cluster-nonexistent2") is None


def test_static_rereads_the_file_after_edits(inventory_file, demo_document, demo_cluster_id):
    path = inventory_file(demo_document)
    inventory = StaticInventory(path)
    assert check(Operation.CREATE_KEY, inventory.describe(demo_cluster_id)).ok

    # an operator marks one HSM degraded
    doc = json.loads(path.read_text())
    doc["Clusters"][0]["Hsms"][1]["State"] = "DEGRADED"
    path.write_text(json.dumps(doc))
    info = inventory.describe(demo_cluster_id)
    assert [h.state for h in info.hsms] == ["ACTIVE", "DEGRADED"]
    assert check(Operation.CREATE_KEY, info).reason is Reason.INSUFFICIENT_HSMS

    # ...then moves it into the first HSM's AZ and brings it back
    doc["Clusters"][0]["Hsms"][1].update(State="ACTIVE", AvailabilityZone="us-east-1a")
    path.write_text(json.dumps(doc))
    info = inventory.describe(demo_cluster_id)
    assert {h.availability_zone for h in info.hsms} == {"us-east-1a"}
    assert check(Operation.CREATE_KEY, info).reason is Reason.INSUFFICIENT_HSMS
    assert check(Operation.CONNECT_CUSTOM_KEY_STORE, info).ok


def _break(doc, path, value):
    """Set doc[path...] = value, where path is a list of keys/indexes; `...` deletes."""
    broken = copy.deepcopy(doc)
    target = broken
    for step in path[:-1]:
        target = target[step]
    if value is Ellipsis:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


MALFORMED = [
    # (path to change, new value or ... to delete, expected JSON path in the message)
    (["Clusters"], ..., r"\$\.Clusters: missing required field"),
    (["Clusters"], {"a": 1}, r"\$\.Clusters: must be an array, got dict"),
    (["Clusters", 0], "x", r"\$\.Clusters\[0\]: must be an object, got str"),
    (["Clusters", 0, "ClusterId"], ..., r"\$\.Clusters\[0\]\.ClusterId: missing required"),
    (["Clusters", 0, "State"], 3, r"\$\.Clusters\[0\]\.State: must be a string, got int"),
    (["Clusters", 0, "Hsms"], "none", r"\$\.Clusters\[0\]\.Hsms: must be an array"),
    (["Clusters", 0, "Hsms", 1], [], r"\$\.Clusters\[0\]\.Hsms\[1\]: must be an object"),
    (
        ["Clusters", 0, "Hsms", 1, "AvailabilityZone"],
        7,
        r"\$\.Clusters\[0\]\.Hsms\[1\]\.AvailabilityZone: must be a string, got int",
    ),
    (["Clusters", 0, "Hsms", 0, "HsmId"], ..., r"\$\.Clusters\[0\]\.Hsms\[0\]\.HsmId: missing"),
    (["Clusters", 0, "Hsms", 0, "State"], None, r"\$\.Clusters\[0\]\.Hsms\[0\]\.State: missing"),
    (["Clusters", 0, "Hsms", 0, "EniIp"], 10, r"Hsms\[0\]\.EniIp: must be a string"),
    (["Clusters", 0, "SubnetMapping"], ["a"], r"\$\.Clusters\[0\]\.SubnetMapping: must be an obj"),
    (
        ["Clusters", 0, "SubnetMapping", "us-east-1a"],
        1,
        r"\$\.Clusters\[0\]\.SubnetMapping\.us-east-1a: must be a string",
    ),
    (["Clusters", 0, "Certificates"], "pem", r"\$\.Clusters\[0\]\.Certificates: must be an obj"),
    (
        ["Clusters", 0, "Certificates", "ClusterCertificate"],
        ["pem"],
        r"\$\.Clusters\[0\]\.Certificates\.ClusterCertificate: must be a string",
    ),
    (["Clusters", 0, "VpcId"], {}, r"\$\.Clusters\[0\]\.VpcId: must be a string"),
]


@pytest.mark.parametrize("case", MALFORMED)
def test_static_malformed_document_names_file_and_field(
    inventory_file, demo_document, demo_cluster_id, case
):
    path, value, message = case
    file = inventory_file(_break(demo_document, path, value))
    with pytest.raises(ConfigError, match=message) as info:
        StaticInventory(file).describe(demo_cluster_id)
    assert str(file) in str(info.value)


def test_static_root_must_be_an_object(inventory_file):
    file = inventory_file("[1, 2]")
    with pytest.raises(ConfigError, match=r"\$: must be an object, got list"):
        StaticInventory(file).describe("cluster-abcdefghijk")


def test_static_duplicate_cluster_ids_are_refused(inventory_file, demo_document, demo_cluster_id):
    doc = copy.deepcopy(demo_document)
    doc["Clusters"].append(copy.deepcopy(doc["Clusters"][0]))
    with pytest.raises(ConfigError, match=r"\$\.Clusters\[1\]\.ClusterId: duplicate"):
        StaticInventory(inventory_file(doc)).describe(demo_cluster_id)


def test_static_invalid_json(inventory_file):
    file = inventory_file('{"Clusters": [')
    with pytest.raises(ConfigError, match="is not valid JSON") as info:
        StaticInventory(file).describe("cluster-abcdefghijk")
    assert str(file) in str(info.value)


def test_static_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"{missing} cannot be read"):
        StaticInventory(missing).describe("cluster-abcdefghijk")


def test_static_uninitialized_cluster_has_no_certificate(inventory_file, demo_document):
    doc = copy.deepcopy(demo_document)
    doc["Clusters"][0].update(State="UNINITIALIZED", Certificates={"ClusterCsr": "csr"}, Hsms=[])
    cid = doc["Clusters"][0]["ClusterId"]
    info = StaticInventory(inventory_file(doc)).describe(cid)
    assert info.cluster_certificate_pem is None
    assert info.hsms == ()


# --- factory -------------------------------------------------------------------------------------


def test_factory_static(tmp_path):
    inventory = inventory_from_settings(InventorySettings("static", path=tmp_path / "c.json"))
    assert isinstance(inventory, StaticInventory)
    assert inventory.path == tmp_path / "c.json"


def test_factory_cloudhsm(aws_env):
    settings = InventorySettings("cloudhsm", region=REGION, endpoint_url="http://127.0.0.1:1")
    inventory = inventory_from_settings(settings)
    assert isinstance(inventory, CloudHsmInventory)
    assert inventory.region == REGION


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (InventorySettings("static"), "needs 'path'"),
        (InventorySettings("ldap"), "must be 'static' or 'cloudhsm'"),
    ],
)
def test_factory_rejects_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        inventory_from_settings(settings)


# --- CloudHsmInventory against moto_server -------------------------------------------------------


def _moto_cluster(cluster_id: str):
    from moto.cloudhsmv2.models import cloudhsmv2_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    return cloudhsmv2_backends[DEFAULT_ACCOUNT_ID][REGION].clusters[cluster_id]


def _hsm(cluster_id, n, az, state="ACTIVE"):
    return {
        "HsmId": f"hsm-{'abcdefghijk'[:10]}{n}",
        "ClusterId": cluster_id,
        "AvailabilityZone": az,
        "SubnetId": f"subnet-{az[-1]}",
        "EniId": f"eni-{n}",
        "EniIp": f"10.0.{n}.10",
        "HsmType": "hsm2m.medium",
        "State": state,
        "StateMessage": "HSM created.",
    }


@pytest.fixture
def moto_cluster_id(moto_endpoint, aws_env, demo_pki):
    """A moto cluster with 2 ACTIVE HSMs in 2 AZs, injected into the server's backend (moto has
    no create_hsm)."""
    client = boto3.client("cloudhsmv2", region_name=REGION, endpoint_url=moto_endpoint)
    created = client.create_cluster(HsmType="hsm2m.medium", SubnetIds=["subnet-a", "subnet-b"])
    cluster_id = created["Cluster"]["ClusterId"]
    cluster = _moto_cluster(cluster_id)
    # moto maps SubnetMapping by region (a known moto bug); set it per AZ as AWS does
    cluster.subnet_mapping = {"us-east-1a": "subnet-a", "us-east-1b": "subnet-b"}
    cluster.certificates["ClusterCertificate"] = demo_pki.cluster_cert_pem
    cluster.hsms.extend([_hsm(cluster_id, 1, "us-east-1a"), _hsm(cluster_id, 2, "us-east-1b")])
    return cluster_id


def test_cloudhsm_describes_injected_hsms(moto_endpoint, moto_cluster_id, demo_pki):
    inventory = CloudHsmInventory(REGION, endpoint_url=moto_endpoint)
    info = inventory.describe(moto_cluster_id)
    assert info is not None
    assert info.cluster_id == moto_cluster_id
    assert info.state == "ACTIVE"
    assert len(info.hsms) == 2
    assert [(h.hsm_id, h.availability_zone, h.state) for h in info.hsms] == [
        ("hsm-abcdefghij1", "us-east-1a", "ACTIVE"),
        ("hsm-abcdefghij2", "us-east-1b", "ACTIVE"),
    ]
    assert info.cluster_certificate_pem == demo_pki.cluster_cert_pem
    assert check(Operation.CREATE_CUSTOM_KEY_STORE, info).ok


def test_cloudhsm_sees_state_changes(moto_endpoint, moto_cluster_id):
    inventory = CloudHsmInventory(REGION, endpoint_url=moto_endpoint)
    cluster = _moto_cluster(moto_cluster_id)
    cluster.hsms[1]["State"] = "DEGRADED"
    info = inventory.describe(moto_cluster_id)
    assert [h.state for h in info.hsms] == ["ACTIVE", "DEGRADED"]
    assert check(Operation.CREATE_KEY, info).reason is Reason.INSUFFICIENT_HSMS
    cluster.state = "UPDATE_IN_PROGRESS"
    info = inventory.describe(moto_cluster_id)
    assert check(Operation.CONNECT_CUSTOM_KEY_STORE, info).reason is Reason.NOT_ACTIVE


def test_cloudhsm_unknown_cluster_is_none(moto_endpoint, aws_env):
    inventory = CloudHsmInventory(REGION, endpoint_url=moto_endpoint)
    assert inventory.describe("cluster-doesnotexist2") is None


def test_cloudhsm_unreachable_endpoint(aws_env):
    inventory = CloudHsmInventory(REGION, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(InventoryUnavailableError, match="could not be called"):
        inventory.describe("cluster-abcdefghijk")


# --- CloudHsmInventory with a stand-in client (errors and pagination) -----------------------------


class _Client:
    """Implements the one method CloudHsmInventory calls; injected through the constructor."""

    def __init__(self, replies=None, error=None):
        self.replies = list(replies or [])
        self.error = error
        self.calls: list[dict] = []

    def describe_clusters(self, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        return self.replies.pop(0)


def _raw_cluster(cluster_id, hsms=()):
    return {"ClusterId": cluster_id, "State": "ACTIVE", "Hsms": list(hsms), "SubnetMapping": {}}


def test_cloudhsm_follows_next_token():
    target = "cluster-bbbbbbbbbbb"
    client = _Client(
        replies=[
            {"Clusters": [], "NextToken": "t1"},
            {"Clusters": [_raw_cluster(target, [_hsm(target, 1, "us-east-1a")])]},
        ]
    )
    info = CloudHsmInventory(REGION, client=client).describe(target)
    assert info.hsms[0].availability_zone == "us-east-1a"
    assert client.calls == [
        {"Filters": {"clusterIds": [target]}},
        {"Filters": {"clusterIds": [target]}, "NextToken": "t1"},
    ]


def test_cloudhsm_ignores_other_clusters_if_filter_is_ignored():
    client = _Client(replies=[{"Clusters": [_raw_cluster("cluster-other000000")]}])
    assert CloudHsmInventory(REGION, client=client).describe("cluster-bbbbbbbbbbb") is None


def test_cloudhsm_access_denied_is_unavailable():
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": "CloudHsmAccessDeniedException", "Message": "not allowed"}},
        "DescribeClusters",
    )
    inventory = CloudHsmInventory(REGION, client=_Client(error=error))
    with pytest.raises(InventoryUnavailableError, match="CloudHsmAccessDeniedException") as info:
        inventory.describe("cluster-bbbbbbbbbbb")
    assert "cluster-bbbbbbbbbbb" in str(info.value)
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)


def test_cloudhsm_unexpected_reply_shape_is_unavailable():
    bad = {"Clusters": [{"ClusterId": "cluster-bbbbbbbbbbb", "State": "ACTIVE", "Hsms": [{}]}]}
    inventory = CloudHsmInventory(REGION, client=_Client(replies=[bad]))
    with pytest.raises(InventoryUnavailableError, match=r"Hsms\[0\]\.HsmId: missing"):
        inventory.describe("cluster-bbbbbbbbbbb")


def test_repr_has_no_client_internals(tmp_path):
    assert repr(StaticInventory(Path("/x/c.json"))) == "StaticInventory('/x/c.json')"
    assert "endpoint_url=None" in repr(CloudHsmInventory(REGION, client=_Client()))
