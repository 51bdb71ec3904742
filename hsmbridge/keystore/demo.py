"""Demo PKI and demo cluster documents for `hsmbridge init` and for tests.

Owns: a throwaway customer CA plus a cluster certificate it signed (what InitializeCluster
produces on CloudHSM), cluster-id generation, and `describe_clusters_document()`, which writes
the exact JSON shape `aws cloudhsmv2 describe-clusters` prints, for `StaticInventory` to read.

WARNING: the CA private key is returned unencrypted. It exists so an operator can sign more demo
certificates; it is never a production trust anchor.

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_ID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"  # cloudhsmv2 ids: [2-7a-z]


@dataclass(frozen=True)
class DemoPki:
    ca_cert_pem: str
    ca_key_pem: str
    cluster_cert_pem: str


@dataclass(frozen=True)
class DemoHsmSpec:
    availability_zone: str
    state: str = "ACTIVE"


@dataclass(frozen=True)
class DemoClusterSpec:
    """One cluster to describe. `hsms`/`subnet_azs` None: two ACTIVE HSMs in <region>a and b."""

    cluster_id: str
    cluster_cert_pem: str | None
    region: str = "us-east-1"
    state: str = "ACTIVE"
    hsms: tuple[DemoHsmSpec, ...] | None = None
    subnet_azs: tuple[str, ...] | None = None
    hsm_type: str = "hsm2m.medium"
    create_timestamp: float | None = None  # None: now

    def default_azs(self) -> tuple[str, ...]:
        return (f"{self.region}a", f"{self.region}b")


def new_cluster_id() -> str:
    return "cluster-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))


def _derived(prefix: str, seed: str, size: int, *, hexa: bool = False) -> str:
    """A stable id derived from `seed`, so rewriting a document keeps HSM and subnet ids."""
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    if hexa:
        return prefix + digest.hex()[:size]
    # base32 uses A-Z and 2-7, which lower-cased is exactly the cloudhsmv2 id alphabet
    return prefix + base64.b32encode(digest).decode("ascii").lower()[:size]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmbridge demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def make_demo_pki(cluster_id: str, valid_days: int = 3650) -> DemoPki:
    """A self-signed EC P-256 CA and a cluster certificate for `cluster_id` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("hsmbridge demo customer CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # On CloudHSM the cluster key lives in the HSM; here any key does, only the signature matters.
    cluster_key = ec.generate_private_key(ec.SECP256R1())
    cluster_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cluster_id))
        .issuer_name(ca_name)
        .public_key(cluster_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return DemoPki(_pem(ca_cert), ca_key_pem, _pem(cluster_cert))


def _hsm_dict(spec: DemoClusterSpec, index: int, hsm: DemoHsmSpec) -> dict[str, Any]:
    seed = f"{spec.cluster_id}/{index}"
    azs = sorted({*(spec.subnet_azs or spec.default_azs()), hsm.availability_zone})
    return {
        "AvailabilityZone": hsm.availability_zone,
        "ClusterId": spec.cluster_id,
        "SubnetId": _derived(
            "subnet-", f"{spec.cluster_id}/{hsm.availability_zone}", 17, hexa=True
        ),
        "EniId": _derived("eni-", seed, 17, hexa=True),
        "EniIp": f"10.0.{azs.index(hsm.availability_zone)}.{10 + index}",
        "HsmId": _derived("hsm-", seed, 11),
        "HsmType": spec.hsm_type,
        "State": hsm.state,
        "StateMessage": "HSM created." if hsm.state == "ACTIVE" else f"HSM is {hsm.state}.",
    }


def _cluster_dict(spec: DemoClusterSpec) -> dict[str, Any]:
    hsms = (
        spec.hsms if spec.hsms is not None else tuple(DemoHsmSpec(az) for az in spec.default_azs())
    )
    subnet_azs = spec.subnet_azs if spec.subnet_azs is not None else spec.default_azs()
    cluster_id = spec.cluster_id
    certificates = {"ClusterCertificate": spec.cluster_cert_pem} if spec.cluster_cert_pem else {}
    return {
        "BackupPolicy": "DEFAULT",
        "BackupRetentionPolicy": {"Type": "DAYS", "Value": "90"},
        "ClusterId": cluster_id,
        "CreateTimestamp": spec.create_timestamp or round(time.time(), 3),
        "Hsms": [_hsm_dict(spec, i, h) for i, h in enumerate(hsms)],
        "HsmType": spec.hsm_type,
        "SecurityGroup": _derived("sg-", cluster_id, 17, hexa=True),
        "State": spec.state,
        "StateMessage": "The cluster is ready for use." if spec.state == "ACTIVE" else "",
        "SubnetMapping": {
            az: _derived("subnet-", f"{cluster_id}/{az}", 17, hexa=True) for az in subnet_azs
        },
        "VpcId": _derived("vpc-", f"vpc/{cluster_id}", 17, hexa=True),
        "NetworkType": "IPV4",
        "Certificates": certificates,
        "Mode": "FIPS",
        "TagList": [],
    }


def describe_clusters_document(clusters: list[DemoClusterSpec]) -> dict[str, Any]:
    """`{"Clusters": [...]}` exactly as `aws cloudhsmv2 describe-clusters` prints it."""
    return {"Clusters": [_cluster_dict(spec) for spec in clusters]}
