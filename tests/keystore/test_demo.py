"""Demo PKI and describe-clusters documents used by `hsmbridge init` and by tests."""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    DemoHsmSpec,
    describe_clusters_document,
    new_cluster_id,
)
from hsmbridge.keystore.inventory import parse_clusters_document
from hsmbridge.keystore.quorum import Operation, Reason, check
from hsmbridge.keystore.trust import load_trust_anchor, verify_cluster_certificate

CLUSTER_RE = re.compile(r"^cluster-[2-7a-z]{11,16}$")
HSM_RE = re.compile(r"^hsm-[2-7a-z]{11}$")


def test_new_cluster_ids_match_the_pattern_and_differ():
    ids = {new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(CLUSTER_RE.match(i) for i in ids)


def test_demo_pki_chain(demo_pki, demo_cluster_id):
    load_trust_anchor(demo_pki.ca_cert_pem)
    verify_cluster_certificate(demo_pki.ca_cert_pem, demo_pki.cluster_cert_pem)
    cluster = x509.load_pem_x509_certificate(demo_pki.cluster_cert_pem.encode())
    assert demo_cluster_id in cluster.subject.rfc4514_string()
    key = serialization.load_pem_private_key(demo_pki.ca_key_pem.encode(), password=None)
    ca = x509.load_pem_x509_certificate(demo_pki.ca_cert_pem.encode())
    assert key.public_key() == ca.public_key()


def test_default_document_shape(demo_document, demo_cluster_id, demo_pki):
    (cluster,) = demo_document["Clusters"]
    assert cluster["ClusterId"] == demo_cluster_id
    assert cluster["State"] == "ACTIVE"
    assert cluster["Certificates"]["ClusterCertificate"] == demo_pki.cluster_cert_pem
    assert isinstance(cluster["CreateTimestamp"], float)
    assert cluster["SubnetMapping"].keys() == {"us-east-1a", "us-east-1b"}
    for key in ("HsmType", "VpcId", "SecurityGroup", "Mode", "BackupPolicy", "NetworkType"):
        assert isinstance(cluster[key], str)
    for hsm in cluster["Hsms"]:
        assert HSM_RE.match(hsm["HsmId"])
        assert hsm["ClusterId"] == demo_cluster_id
        assert hsm["SubnetId"] == cluster["SubnetMapping"][hsm["AvailabilityZone"]]
        for key in ("EniId", "EniIp", "HsmType", "State", "StateMessage"):
            assert isinstance(hsm[key], str)
    (info,) = parse_clusters_document(demo_document)
    assert check(Operation.CREATE_CUSTOM_KEY_STORE, info).ok


def test_ids_are_stable_for_a_cluster(demo_cluster_id, demo_pki):
    spec = DemoClusterSpec(demo_cluster_id, demo_pki.cluster_cert_pem, create_timestamp=1.0)
    assert describe_clusters_document([spec]) == describe_clusters_document([spec])


def test_custom_hsms_and_state():
    cid = new_cluster_id()
    spec = DemoClusterSpec(
        cid,
        None,
        region="eu-west-1",
        state="UNINITIALIZED",
        hsms=(DemoHsmSpec("eu-west-1a"), DemoHsmSpec("eu-west-1c", "DEGRADED")),
    )
    (cluster,) = describe_clusters_document([spec])["Clusters"]
    assert cluster["Certificates"] == {}
    assert [h["State"] for h in cluster["Hsms"]] == ["ACTIVE", "DEGRADED"]
    (info,) = parse_clusters_document({"Clusters": [cluster]})
    assert check(Operation.CONNECT_CUSTOM_KEY_STORE, info).reason is Reason.NOT_ACTIVE
