"""The CloudHSM v2 API over the static inventory (`CloudHsmService`), on a fake HSM.

The point of the feature: HSMs that DeleteHsm removes and CreateHsm adds change what KMS's
quorum checks see, at once and after the transition delay, because both read the same file.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import datetime
from typing import Any

import pytest

from hsmbridge.errors import (
    AccessDeniedException,
    CloudHsmClusterInvalidConfigurationException,
    CloudHsmInternalFailureException,
    CloudHsmInvalidRequestException,
    CloudHsmResourceLimitExceededException,
    CloudHsmResourceNotFoundException,
    CloudHsmServiceException,
    CloudHsmTagException,
)
from hsmbridge.identity.iam import IamDirectory, write_demo_iam
from hsmbridge.keystore.inventory import TRANSITION_AT
from hsmbridge.keystore.inventory_file import InventoryFile
from hsmbridge.request import RequestContext
from hsmbridge.service.cloudhsm import CloudHsmService
from tests.callers import ADMIN, OTHER_ACCOUNT, OUTSIDER, OUTSIDER_ARN
from tests.harness import ACCOUNT, KmsEnv
from tests.service.steps import key_request

DELAY = 5
NOBODY = RequestContext(f"arn:aws:iam::{ACCOUNT}:user/nobody", ACCOUNT)  # no IAM policy at all


def _service(env: KmsEnv) -> CloudHsmService:
    # KMS's quorum checks resolve transitions with the service's clock (bootstrap passes it to
    # the inventory), the same one the API stamps them with.
    return CloudHsmService(
        env.svc.ctx, InventoryFile(env.inventory_path, clock=env.clock), transition_delay_s=DELAY
    )


def _cluster(svc: CloudHsmService, env: KmsEnv) -> dict[str, Any]:
    clusters, token = svc.describe_clusters(
        ADMIN, filters={"clusterIds": [env.cluster_id]}, max_results=None, next_token=None
    )
    assert token is None
    assert len(clusters) == 1
    return clusters[0]


def _stored(env: KmsEnv) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(env.inventory_path.read_text())
    return doc


# --- the seed scenario -------------------------------------------------------------------------


def test_delete_then_create_hsm_drives_the_kms_quorum(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    env.svc.keys.create(ADMIN, key_request(env))  # two ACTIVE HSMs in two AZs: fine
    before = _cluster(svc, env)
    victim = next(h for h in before["Hsms"] if h["AvailabilityZone"] == "us-east-1b")

    assert svc.delete_hsm(ADMIN, env.cluster_id, hsm_id=victim["HsmId"], eni_id=None, eni_ip=None)
    states = {h["HsmId"]: h["State"] for h in _cluster(svc, env)["Hsms"]}
    assert states[victim["HsmId"]] == "DELETE_IN_PROGRESS"
    # Already no longer ACTIVE: KMS refuses at once.
    with pytest.raises(CloudHsmClusterInvalidConfigurationException):
        env.svc.keys.create(ADMIN, key_request(env))
    env.clock.advance(DELAY)
    assert victim["HsmId"] not in {h["HsmId"] for h in _cluster(svc, env)["Hsms"]}
    with pytest.raises(CloudHsmClusterInvalidConfigurationException):
        env.svc.keys.create(ADMIN, key_request(env))

    hsm = svc.create_hsm(ADMIN, env.cluster_id, "us-east-1b", None)
    assert hsm["State"] == "CREATE_IN_PROGRESS"
    assert hsm["AvailabilityZone"] == "us-east-1b"
    assert hsm["SubnetId"] == before["SubnetMapping"]["us-east-1b"]
    assert re.fullmatch(r"hsm-[2-7a-z]{11}", hsm["HsmId"])
    assert re.fullmatch(r"eni-[0-9a-f]{17}", hsm["EniId"])
    assert TRANSITION_AT not in hsm
    with pytest.raises(CloudHsmClusterInvalidConfigurationException):
        env.svc.keys.create(ADMIN, key_request(env))  # still being created
    env.clock.advance(DELAY)
    states = {h["HsmId"]: h["State"] for h in _cluster(svc, env)["Hsms"]}
    assert states[hsm["HsmId"]] == "ACTIVE"
    env.svc.keys.create(ADMIN, key_request(env))  # two AZs again


def test_delete_hsm_by_eni_id_or_ip_and_repeated(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    first, second = _cluster(svc, env)["Hsms"]
    assert svc.delete_hsm(ADMIN, env.cluster_id, hsm_id=None, eni_id=first["EniId"], eni_ip=None)
    env.clock.advance(1)
    # A second delete of an HSM being deleted changes nothing (its end time stays).
    assert (
        svc.delete_hsm(ADMIN, env.cluster_id, hsm_id=first["HsmId"], eni_id=None, eni_ip=None)
        == first["HsmId"]
    )
    assert (
        svc.delete_hsm(ADMIN, env.cluster_id, hsm_id=None, eni_id=None, eni_ip=second["EniIp"])
        == (second["HsmId"])
    )
    stored = {h["HsmId"]: h for h in _stored(env)["Clusters"][0]["Hsms"]}
    assert stored[first["HsmId"]][TRANSITION_AT] == env.clock() - 1 + DELAY
    env.clock.advance(DELAY - 1)
    assert [h["HsmId"] for h in _cluster(svc, env)["Hsms"]] == [second["HsmId"]]
    env.clock.advance(1)
    assert _cluster(svc, env)["Hsms"] == []


def test_create_hsm_addresses(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    existing = {h["AvailabilityZone"]: h for h in _cluster(svc, env)["Hsms"]}
    subnet_a = ipaddress.IPv4Network(f"{existing['us-east-1a']['EniIp']}/24", strict=False)
    picked = svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", None)
    assert ipaddress.IPv4Address(picked["EniIp"]) in subnet_a
    assert picked["EniIp"] != existing["us-east-1a"]["EniIp"]
    chosen = str(subnet_a.network_address + 200)
    made = svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", chosen)
    assert made["EniIp"] == chosen
    for bad_ip in (
        chosen,  # taken
        existing["us-east-1a"]["EniIp"],  # taken by the demo HSM
        str(subnet_a.network_address + 1),  # reserved by AWS
        str(subnet_a.broadcast_address),
        existing["us-east-1b"]["EniIp"],  # another subnet's
        "192.168.1.20",
        "not-an-ip",
    ):
        with pytest.raises(CloudHsmInvalidRequestException, match="IpAddress"):
            svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", bad_ip)
    ids = [h["HsmId"] for h in _cluster(svc, env)["Hsms"]]
    assert len(ids) == len(set(ids)) == 4


def test_create_hsm_in_an_empty_subnet_invents_a_distinct_range(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    for hsm in _cluster(svc, env)["Hsms"]:
        svc.delete_hsm(ADMIN, env.cluster_id, hsm_id=hsm["HsmId"], eni_id=None, eni_ip=None)
    env.clock.advance(DELAY)
    a = svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", None)
    b = svc.create_hsm(ADMIN, env.cluster_id, "us-east-1b", None)
    net_a = ipaddress.IPv4Network(f"{a['EniIp']}/24", strict=False)
    net_b = ipaddress.IPv4Network(f"{b['EniIp']}/24", strict=False)
    assert net_a != net_b
    assert a["EniIp"] == str(net_a.network_address + 4)  # first address AWS does not reserve


def test_create_and_delete_hsm_refusals(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    before = env.inventory_path.read_bytes()
    with pytest.raises(CloudHsmInvalidRequestException, match="us-east-1c"):
        svc.create_hsm(ADMIN, env.cluster_id, "us-east-1c", None)
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.create_hsm(ADMIN, "cluster-234567abcde", "us-east-1a", None)
    hsm_id = _cluster(svc, env)["Hsms"][0]["HsmId"]
    for ids in (
        {"hsm_id": None, "eni_id": None, "eni_ip": None},
        {"hsm_id": hsm_id, "eni_id": "eni-0123456789abcdef0", "eni_ip": None},
    ):
        with pytest.raises(CloudHsmInvalidRequestException, match="exactly one"):
            svc.delete_hsm(ADMIN, env.cluster_id, **ids)
    for ids in (
        {"hsm_id": "hsm-234567abcde", "eni_id": None, "eni_ip": None},
        {"hsm_id": None, "eni_id": "eni-0123456789abcdef0", "eni_ip": None},
        {"hsm_id": None, "eni_id": None, "eni_ip": "10.9.9.9"},
    ):
        with pytest.raises(CloudHsmResourceNotFoundException):
            svc.delete_hsm(ADMIN, env.cluster_id, **ids)
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.delete_hsm(ADMIN, "cluster-234567abcde", hsm_id=hsm_id, eni_id=None, eni_ip=None)
    assert env.inventory_path.read_bytes() == before  # nothing written

    env.write_inventory(cluster_state="UPDATE_IN_PROGRESS")
    with pytest.raises(CloudHsmInvalidRequestException, match="UPDATE_IN_PROGRESS"):
        svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", None)


def test_broken_inventory_is_an_internal_failure(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    env.inventory_path.write_text("{")
    with pytest.raises(CloudHsmInternalFailureException) as caught:
        svc.describe_clusters(ADMIN, filters=None, max_results=None, next_token=None)
    assert caught.value.fault
    with pytest.raises(CloudHsmInternalFailureException):
        svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", None)


def test_error_classes_follow_the_model_fault_flags() -> None:
    assert CloudHsmInternalFailureException.fault
    assert not CloudHsmServiceException.fault  # the model flags no fault on it
    assert not CloudHsmInvalidRequestException.fault
    assert CloudHsmTagException.code == "CloudHsmTagException"


# --- DescribeClusters ----------------------------------------------------------------------------


def test_describe_clusters_publishes_the_model_shape(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    svc.create_hsm(ADMIN, env.cluster_id, "us-east-1a", None)
    assert any(TRANSITION_AT in h for h in _stored(env)["Clusters"][0]["Hsms"])
    cluster = _cluster(svc, env)
    assert isinstance(cluster["CreateTimestamp"], datetime)
    assert cluster["CreateTimestamp"].tzinfo is not None
    assert not any(k.startswith("Hsmbridge") for h in cluster["Hsms"] for k in h)
    assert cluster["State"] == "ACTIVE"
    assert cluster["Certificates"]["ClusterCertificate"] == env.pki.cluster_cert_pem


def _two_more_clusters(env: KmsEnv) -> list[str]:
    doc = _stored(env)
    template = doc["Clusters"][0]
    ids = ["cluster-22222222222", "cluster-33333333333"]
    for cluster_id, state, vpc in zip(
        ids, ("UNINITIALIZED", "ACTIVE"), ("vpc-2", "vpc-3"), strict=True
    ):
        doc["Clusters"].append(
            {**template, "ClusterId": cluster_id, "State": state, "VpcId": vpc, "Hsms": []}
        )
    env.inventory_path.write_text(json.dumps(doc))
    return [env.cluster_id, *ids]


def test_describe_clusters_filters_and_pages(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    all_ids = _two_more_clusters(env)

    def ids(filters: dict[str, list[str]] | None) -> list[str]:
        found, _ = svc.describe_clusters(ADMIN, filters=filters, max_results=None, next_token=None)
        return [c["ClusterId"] for c in found]

    assert ids(None) == all_ids
    assert ids({"states": ["ACTIVE"]}) == [all_ids[0], all_ids[2]]
    assert ids({"vpcIds": ["vpc-2", "vpc-3"], "states": ["ACTIVE"]}) == [all_ids[2]]
    assert ids({"clusterIds": [all_ids[1]]}) == [all_ids[1]]
    assert ids({"clusterIds": []}) == []
    with pytest.raises(CloudHsmInvalidRequestException, match="hsmTypes"):
        ids({"hsmTypes": ["hsm1.medium"]})

    seen, token, pages = [], None, 0
    while True:
        page, token = svc.describe_clusters(ADMIN, filters=None, max_results=2, next_token=token)
        seen += [c["ClusterId"] for c in page]
        pages += 1
        if token is None:
            break
    assert (seen, pages) == (all_ids, 2)
    for bad in (0, 26):
        with pytest.raises(CloudHsmInvalidRequestException, match="MaxResults"):
            svc.describe_clusters(ADMIN, filters=None, max_results=bad, next_token=None)
    with pytest.raises(CloudHsmInvalidRequestException, match="NextToken"):
        svc.describe_clusters(ADMIN, filters=None, max_results=None, next_token="garbage!")


# --- authorization -------------------------------------------------------------------------------


def test_callers_without_iam_allow_are_denied(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    before = env.inventory_path.read_bytes()
    calls = [
        lambda: svc.describe_clusters(NOBODY, filters=None, max_results=None, next_token=None),
        lambda: svc.create_hsm(NOBODY, env.cluster_id, "us-east-1a", None),
        lambda: svc.delete_hsm(
            NOBODY, env.cluster_id, hsm_id="hsm-234567abcde", eni_id=None, eni_ip=None
        ),
        lambda: svc.list_tags(NOBODY, env.cluster_id, next_token=None, max_results=None),
        lambda: svc.tag_resource(NOBODY, env.cluster_id, [{"Key": "k", "Value": "v"}]),
        lambda: svc.untag_resource(NOBODY, env.cluster_id, ["k"]),
    ]
    for call in calls:
        with pytest.raises(AccessDeniedException, match="cloudhsm:"):
            call()
    assert env.inventory_path.read_bytes() == before


def test_iam_sees_the_cluster_arn(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    arn = svc.cluster_arn(env.cluster_id)
    assert arn == f"arn:aws:cloudhsm:us-east-1:{ACCOUNT}:cluster/{env.cluster_id}"
    with pytest.raises(AccessDeniedException, match=re.escape(arn)):
        svc.create_hsm(NOBODY, env.cluster_id, "us-east-1a", None)


def test_other_accounts_see_no_clusters(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    # Their own account's IAM allows everything; still, this endpoint keeps no cluster of theirs.
    write_demo_iam(env.root / "iam" / f"{OTHER_ACCOUNT}.json", OTHER_ACCOUNT, OUTSIDER_ARN)
    env.svc.ctx.access.iam = IamDirectory(env.root / "iam", interval_s=0)  # read it at once
    assert svc.describe_clusters(OUTSIDER, filters=None, max_results=None, next_token=None) == (
        [],
        None,
    )
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.create_hsm(OUTSIDER, env.cluster_id, "us-east-1a", None)
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.list_tags(OUTSIDER, env.cluster_id, next_token=None, max_results=None)
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.tag_resource(OUTSIDER, env.cluster_id, [{"Key": "k", "Value": "v"}])


# --- tags ----------------------------------------------------------------------------------------


def test_tags_round_trip_and_page(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    cid = env.cluster_id
    assert svc.list_tags(ADMIN, cid, next_token=None, max_results=None) == ([], None)
    svc.tag_resource(ADMIN, cid, [{"Key": "team", "Value": "crypto"}, {"Key": "env", "Value": ""}])
    svc.tag_resource(ADMIN, cid, [{"Key": "team", "Value": "platform"}])  # overwrites
    assert svc.list_tags(ADMIN, cid, next_token=None, max_results=None) == (
        [{"Key": "team", "Value": "platform"}, {"Key": "env", "Value": ""}],
        None,
    )
    assert _cluster(svc, env)["TagList"] == [
        {"Key": "team", "Value": "platform"},
        {"Key": "env", "Value": ""},
    ]
    first, token = svc.list_tags(ADMIN, cid, next_token=None, max_results=1)
    assert first == [{"Key": "team", "Value": "platform"}]
    assert token is not None
    second, token = svc.list_tags(ADMIN, cid, next_token=token, max_results=1)
    assert second == [{"Key": "env", "Value": ""}]
    assert token is None
    svc.untag_resource(ADMIN, cid, ["team", "absent"])
    assert svc.list_tags(ADMIN, cid, next_token=None, max_results=None) == (
        [{"Key": "env", "Value": ""}],
        None,
    )


def test_tag_refusals(fake_env: KmsEnv) -> None:
    env, svc = fake_env, _service(fake_env)
    cid = env.cluster_id
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.tag_resource(ADMIN, "cluster-234567abcde", [{"Key": "k", "Value": "v"}])
    with pytest.raises(CloudHsmResourceNotFoundException):
        svc.list_tags(ADMIN, "backup-234567abcde", next_token=None, max_results=None)
    with pytest.raises(CloudHsmTagException, match="aws:"):
        svc.tag_resource(ADMIN, cid, [{"Key": "aws:owner", "Value": "v"}])
    for bad in (
        [],
        [{"Key": "", "Value": "v"}],
        [{"Key": "k", "Value": "v\n"}],
        [{"Key": "k" * 129, "Value": "v"}],
        [{"Key": "k", "Value": "v" * 257}],
        [{"Key": f"k{i}", "Value": "v"} for i in range(51)],
    ):
        with pytest.raises(CloudHsmInvalidRequestException):
            svc.tag_resource(ADMIN, cid, bad)
    with pytest.raises(CloudHsmInvalidRequestException):
        svc.untag_resource(ADMIN, cid, [])
    svc.tag_resource(ADMIN, cid, [{"Key": f"a{i}", "Value": "v"} for i in range(50)])
    with pytest.raises(CloudHsmResourceLimitExceededException):
        svc.tag_resource(ADMIN, cid, [{"Key": "one-more", "Value": "v"}])
    for bad_max in (0, 101):
        with pytest.raises(CloudHsmInvalidRequestException, match="MaxResults"):
            svc.list_tags(ADMIN, cid, next_token=None, max_results=bad_max)
    assert len(svc.list_tags(ADMIN, cid, next_token=None, max_results=100)[0]) == 50
