"""The AZ-quorum rule table and its messages."""

from __future__ import annotations

import pytest

from hsmbridge.keystore.inventory import ClusterInfo, HsmInfo
from hsmbridge.keystore.quorum import HSM_RULES, OK, Operation, Reason, check

CID = "cluster-abcdefghijk"
TWO_AZ_SUBNETS = {"us-east-1a": "subnet-a", "us-east-1b": "subnet-b"}

CREATE_STORE = Operation.CREATE_CUSTOM_KEY_STORE
UPDATE_STORE = Operation.UPDATE_CUSTOM_KEY_STORE
CONNECT = Operation.CONNECT_CUSTOM_KEY_STORE
CREATE_KEY = Operation.CREATE_KEY


def hsm(hsm_id: str, az: str, state: str = "ACTIVE") -> HsmInfo:
    return HsmInfo(hsm_id, az, state, subnet_id=f"subnet-{az[-1]}", eni_ip="10.0.0.1")


def cluster(*hsms: HsmInfo, state: str = "ACTIVE", subnets: dict[str, str] | None = None):
    return ClusterInfo(
        cluster_id=CID,
        state=state,
        hsms=hsms,
        subnet_mapping=TWO_AZ_SUBNETS if subnets is None else subnets,
    )


HEALTHY = cluster(hsm("hsm-aaaaaaaaaaa", "us-east-1a"), hsm("hsm-bbbbbbbbbbb", "us-east-1b"))
ONE_HSM = cluster(hsm("hsm-aaaaaaaaaaa", "us-east-1a"))
SAME_AZ = cluster(hsm("hsm-aaaaaaaaaaa", "us-east-1a"), hsm("hsm-bbbbbbbbbbb", "us-east-1a"))
NO_HSMS = cluster()
ONE_DEGRADED = cluster(
    hsm("hsm-aaaaaaaaaaa", "us-east-1a"), hsm("hsm-bbbbbbbbbbb", "us-east-1b", "DEGRADED")
)
ALL_DEGRADED = cluster(hsm("hsm-aaaaaaaaaaa", "us-east-1a", "DEGRADED"))
INACTIVE = cluster(
    hsm("hsm-aaaaaaaaaaa", "us-east-1a"), hsm("hsm-bbbbbbbbbbb", "us-east-1b"), state="DEGRADED"
)
UNINITIALIZED = cluster(state="UNINITIALIZED")
ONE_SUBNET = cluster(
    hsm("hsm-aaaaaaaaaaa", "us-east-1a"),
    hsm("hsm-bbbbbbbbbbb", "us-east-1b"),
    subnets={"us-east-1a": "subnet-a"},
)

CASES = [
    # (operation, cluster, expected reason or None)
    (CREATE_STORE, HEALTHY, None),
    (UPDATE_STORE, HEALTHY, None),
    (CREATE_KEY, HEALTHY, None),
    (CONNECT, HEALTHY, None),
    (CONNECT, ONE_HSM, None),
    (CREATE_KEY, ONE_HSM, Reason.INSUFFICIENT_HSMS),
    (CREATE_STORE, ONE_HSM, Reason.INSUFFICIENT_HSMS),
    (CREATE_KEY, SAME_AZ, Reason.INSUFFICIENT_HSMS),
    (UPDATE_STORE, SAME_AZ, Reason.INSUFFICIENT_HSMS),
    (CONNECT, SAME_AZ, None),
    (CONNECT, NO_HSMS, Reason.INSUFFICIENT_HSMS),
    (CREATE_KEY, NO_HSMS, Reason.INSUFFICIENT_HSMS),
    (CREATE_KEY, ONE_DEGRADED, Reason.INSUFFICIENT_HSMS),
    (CONNECT, ONE_DEGRADED, None),
    (CONNECT, ALL_DEGRADED, Reason.INSUFFICIENT_HSMS),
    (CREATE_STORE, INACTIVE, Reason.NOT_ACTIVE),
    (UPDATE_STORE, INACTIVE, Reason.NOT_ACTIVE),
    (CONNECT, UNINITIALIZED, Reason.NOT_ACTIVE),
    # CreateKey has no CloudHsmClusterNotActiveException in the KMS model: its NOT_ACTIVE is
    # answered as CloudHsmClusterInvalidConfigurationException (service/clusters.py).
    (CREATE_KEY, INACTIVE, Reason.NOT_ACTIVE),  # a DEGRADED cluster, whatever its HSMs say
    (CREATE_KEY, UNINITIALIZED, Reason.NOT_ACTIVE),
    (CREATE_STORE, ONE_SUBNET, Reason.INVALID_CONFIGURATION),
    (UPDATE_STORE, ONE_SUBNET, Reason.INVALID_CONFIGURATION),
    (CREATE_KEY, ONE_SUBNET, None),
    (CONNECT, ONE_SUBNET, None),
]


@pytest.mark.parametrize(("op", "info", "expected"), CASES)
def test_rule_table(op, info, expected):
    verdict = check(op, info)
    assert verdict.reason is expected
    assert verdict.ok is (expected is None)
    if expected is None:
        assert verdict == OK
    else:
        assert CID in verdict.message
        assert str(op) in verdict.message


def test_table_is_the_documented_data():
    assert dict(HSM_RULES) == {
        CREATE_STORE: (2, 2),
        UPDATE_STORE: (2, 2),
        CREATE_KEY: (2, 2),
        CONNECT: (1, 1),
    }
    assert {str(op) for op in Operation} == {
        "CreateCustomKeyStore",
        "UpdateCustomKeyStore",
        "ConnectCustomKeyStore",
        "CreateKey",
    }


def test_message_names_the_one_active_hsm_and_what_is_missing():
    message = check(CREATE_KEY, ONE_HSM).message
    assert message == (
        f"cluster {CID} has 1 ACTIVE HSM (hsm-aaaaaaaaaaa in us-east-1a) in 1 Availability Zone; "
        "CreateKey needs at least 2 ACTIVE HSMs in 2 different Availability Zones"
    )


def test_message_for_two_hsms_in_one_az_counts_zones():
    message = check(CREATE_STORE, SAME_AZ).message
    assert "2 ACTIVE HSMs" in message
    assert "in 1 Availability Zone;" in message
    assert "2 different Availability Zones" in message


def test_message_lists_degraded_hsms_as_not_counted():
    message = check(CREATE_KEY, ONE_DEGRADED).message
    assert "1 ACTIVE HSM (hsm-aaaaaaaaaaa in us-east-1a)" in message
    assert "not counted: hsm-bbbbbbbbbbb in us-east-1b is DEGRADED" in message


def test_message_for_no_hsms_and_connect():
    message = check(CONNECT, NO_HSMS).message
    assert message == (
        f"cluster {CID} has no ACTIVE HSMs; ConnectCustomKeyStore needs at least 1 ACTIVE HSM"
    )


def test_message_for_inactive_cluster_names_state():
    message = check(CONNECT, UNINITIALIZED).message
    assert "is UNINITIALIZED" in message
    assert "needs an ACTIVE cluster" in message


def test_message_for_subnets_names_zones():
    message = check(CREATE_STORE, ONE_SUBNET).message
    assert "subnets in 1 Availability Zone (us-east-1a)" in message
    assert "at least 2 Availability Zones" in message


def test_cluster_state_is_checked_before_hsms():
    # An inactive cluster without HSMs reports NOT_ACTIVE, the more fundamental problem.
    assert check(CREATE_STORE, UNINITIALIZED).reason is Reason.NOT_ACTIVE
