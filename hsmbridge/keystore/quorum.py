"""The AZ-quorum rules KMS applies to a CloudHSM cluster, per operation, as data.

Owns: the rule tables, the `Operation` and `Reason` enums, and the pure `check()` that returns a
`Verdict`. It raises no KMS errors: the service maps `Reason.NOT_ACTIVE` to
CloudHsmClusterNotActiveException and `INVALID_CONFIGURATION` / `INSUFFICIENT_HSMS` to
CloudHsmClusterInvalidConfigurationException (or, for an asynchronous connect,
ConnectionErrorCode.INSUFFICIENT_CLOUDHSM_HSMS).

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli; no I/O of any kind.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from hsmbridge.keystore.inventory import ACTIVE, ClusterInfo, HsmInfo


class Operation(enum.StrEnum):
    CREATE_CUSTOM_KEY_STORE = "CreateCustomKeyStore"
    UPDATE_CUSTOM_KEY_STORE = "UpdateCustomKeyStore"  # only when CloudHsmClusterId changes
    CONNECT_CUSTOM_KEY_STORE = "ConnectCustomKeyStore"
    CREATE_KEY = "CreateKey"


class Reason(enum.StrEnum):
    NOT_ACTIVE = "NOT_ACTIVE"  # cluster State is not ACTIVE
    INVALID_CONFIGURATION = "INVALID_CONFIGURATION"  # subnets in too few AZs
    INSUFFICIENT_HSMS = "INSUFFICIENT_HSMS"  # too few ACTIVE HSMs, or in too few AZs


# {operation: (min_active_hsms, min_distinct_azs)}; only HSMs whose State is exactly ACTIVE
# count. NOTE: whether KMS counts DEGRADED HSMs is not documented; we do not count them,
# because a degraded HSM may not hold every key (CloudHSM key-availability quorum).
HSM_RULES: Final[Mapping[Operation, tuple[int, int]]] = {
    Operation.CREATE_CUSTOM_KEY_STORE: (2, 2),
    Operation.UPDATE_CUSTOM_KEY_STORE: (2, 2),
    Operation.CREATE_KEY: (2, 2),
    Operation.CONNECT_CUSTOM_KEY_STORE: (1, 1),
}

# {operation: minimum number of AZs in the cluster's SubnetMapping}
SUBNET_RULES: Final[Mapping[Operation, int]] = {
    Operation.CREATE_CUSTOM_KEY_STORE: 2,
    Operation.UPDATE_CUSTOM_KEY_STORE: 2,
}

# Operations that require cluster State == ACTIVE. CreateKey is deliberately absent: the KMS
# model does not list CloudHsmClusterNotActiveException among CreateKey's errors.
# CreateKey too: KMS's documentation lists no state rule for it, but a key made in a cluster
# that is UNINITIALIZED, DEGRADED or being deleted is not one to trust; its model's error for
# cluster trouble is CloudHsmClusterInvalidConfigurationException (service/clusters.py).
ACTIVE_CLUSTER_REQUIRED: Final[frozenset[Operation]] = frozenset(
    {
        Operation.CREATE_CUSTOM_KEY_STORE,
        Operation.UPDATE_CUSTOM_KEY_STORE,
        Operation.CONNECT_CUSTOM_KEY_STORE,
        Operation.CREATE_KEY,
    }
)


@dataclass(frozen=True)
class Verdict:
    """`reason` is None when the cluster satisfies the operation's rules."""

    reason: Reason | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


OK: Final = Verdict()


def check(op: Operation, cluster: ClusterInfo) -> Verdict:
    """Whether `cluster` meets `op`'s requirements; the first unmet rule wins."""
    if op in ACTIVE_CLUSTER_REQUIRED and cluster.state != ACTIVE:
        return Verdict(
            Reason.NOT_ACTIVE,
            f"cluster {cluster.cluster_id} is {cluster.state}; {op} needs an ACTIVE cluster "
            "(initialized and activated)",
        )
    min_subnet_azs = SUBNET_RULES.get(op, 0)
    if len(cluster.subnet_mapping) < min_subnet_azs:
        return Verdict(Reason.INVALID_CONFIGURATION, _subnet_message(op, cluster, min_subnet_azs))
    min_hsms, min_azs = HSM_RULES[op]
    active = cluster.active_hsms
    if len(active) < min_hsms or len({h.availability_zone for h in active}) < min_azs:
        return Verdict(Reason.INSUFFICIENT_HSMS, _hsm_message(op, cluster, min_hsms, min_azs))
    return OK


def _subnet_message(op: Operation, cluster: ClusterInfo, needed: int) -> str:
    azs = ", ".join(sorted(cluster.subnet_mapping)) or "none"
    count = len(cluster.subnet_mapping)
    return (
        f"cluster {cluster.cluster_id} has private subnets in {count} Availability "
        f"{_plural(count, 'Zone')} ({azs}); {op} needs subnets in at least {needed} "
        "Availability Zones"
    )


def _hsm_message(op: Operation, cluster: ClusterInfo, min_hsms: int, min_azs: int) -> str:
    active = cluster.active_hsms
    if active:
        listed = ", ".join(_where(h) for h in active)
        zones = len({h.availability_zone for h in active})
        have = (
            f"{len(active)} ACTIVE {_plural(len(active), 'HSM')} ({listed}) in {zones} "
            f"Availability {_plural(zones, 'Zone')}"
        )
    else:
        have = "no ACTIVE HSMs"
    need = f"at least {min_hsms} ACTIVE {_plural(min_hsms, 'HSM')}"
    if min_azs > 1:
        need += f" in {min_azs} different Availability Zones"
    message = f"cluster {cluster.cluster_id} has {have}; {op} needs {need}"
    others = [h for h in cluster.hsms if h.state != ACTIVE]
    if others:
        listed = ", ".join(f"{_where(h)} is {h.state}" for h in others)
        message += f" (not counted: {listed})"
    return message


def _where(hsm: HsmInfo) -> str:
    return f"{hsm.hsm_id} in {hsm.availability_zone}"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"
