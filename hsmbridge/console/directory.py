"""What the console shows beside KMS answers: an account's IAM users and roles, and cluster facts.

Owns: `Directory`, over the IAM directory and the cluster inventory the service already loaded
(no second copy, the same reloads): `principals(account)` lists the ARNs of the account's IAM
users and roles (the key administrator and key user checkboxes of the "Create key" wizard), and
`cluster(cluster_id)` summarises a store's cluster (ACTIVE HSM count and their Availability
Zones) for the store chooser. Both are shown only beside answers the caller was authorized for
(DescribeCustomKeyStores), and the service re-checks everything the caller submits.
Must not import uvicorn or pkcs11.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsmbridge.errors import KmsError
from hsmbridge.identity.iam import IamDirectory
from hsmbridge.keystore import quorum
from hsmbridge.service.clusters import ClusterFacts


@dataclass(frozen=True, slots=True)
class ClusterSummary:
    cluster_id: str
    found: bool
    state: str
    active_hsms: int
    availability_zones: tuple[str, ...]  # of the ACTIVE HSMs, sorted
    create_key_problem: str | None  # why CreateKey would be refused by the cluster rules
    error: str | None = None  # the inventory could not be read


class Directory:
    def __init__(self, iam: IamDirectory, clusters: ClusterFacts) -> None:
        self._iam = iam
        self._clusters = clusters

    def principals(self, account_id: str) -> tuple[list[str], list[str]]:
        """(user ARNs, role ARNs) of `account_id`'s IAM file, sorted; empty without a file."""
        return self._iam.principals(account_id)

    def cluster(self, cluster_id: str) -> ClusterSummary:
        try:
            info = self._clusters.describe(cluster_id)
        except KmsError as exc:
            return ClusterSummary(cluster_id, False, "", 0, (), None, f"{exc.code}: {exc.message}")
        if info is None:
            return ClusterSummary(
                cluster_id, False, "", 0, (), f"cluster {cluster_id} was not found"
            )
        active = info.active_hsms
        verdict = quorum.check(quorum.Operation.CREATE_KEY, info)
        return ClusterSummary(
            cluster_id,
            True,
            info.state,
            len(active),
            tuple(sorted({h.availability_zone for h in active})),
            None if verdict.ok else verdict.message,
        )
