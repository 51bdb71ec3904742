"""What a custom key store's `ConnectionErrorCode` means and what to do about it.

Owns: `TROUBLESHOOTING`, one text per code (after AWS KMS's "Troubleshooting a custom key store"
guide, in hsmbridge's terms: the cluster inventory, the PKCS#11 token, the kmsuser password), and
`why_not_choosable`, the store chooser's sentence for a store that is not CONNECTED.
Must not import anything above `hsmbridge.model`.
"""

from __future__ import annotations

from typing import Final

from hsmbridge.model import ConnectionErrorCode, ConnectionState

_E = ConnectionErrorCode
TROUBLESHOOTING: Final[dict[str, str]] = {
    _E.INVALID_CREDENTIALS: (
        "The kmsuser password of the key store was refused by the cluster. Disconnect the key "
        "store, set the current kmsuser password with Edit (KeyStorePassword), and connect again."
    ),
    _E.CLUSTER_NOT_FOUND: (
        "The CloudHSM cluster of the key store is not in the cluster inventory. Check the "
        "cluster ID and the inventory, or edit the key store to name a related cluster."
    ),
    _E.NETWORK_ERRORS: (
        "The HSMs of the cluster could not be reached. Check that the cluster's HSMs are running "
        "and reachable from this server, then disconnect and connect the key store again."
    ),
    _E.INTERNAL_ERROR: (
        "The connection failed for an internal reason. Disconnect the key store and connect it "
        "again; if it fails again, the server log names the cause."
    ),
    _E.INSUFFICIENT_CLOUDHSM_HSMS: (
        "The cluster has no ACTIVE HSM. Add an HSM to the cluster (at least two in different "
        "Availability Zones to create keys), wait until it is ACTIVE, then connect again."
    ),
    _E.USER_LOCKED_OUT: (
        "The kmsuser crypto user is locked out after failed logins. Reset its password in the "
        "cluster, update the key store's password, then connect again."
    ),
    _E.USER_NOT_FOUND: (
        "The cluster has no kmsuser crypto user. Create kmsuser in the cluster with the key "
        "store's password, then connect again."
    ),
    _E.USER_LOGGED_IN: (
        "kmsuser is logged in to the cluster by another client, so the key store cannot log in. "
        "Log kmsuser out of the cluster (or change its password and update the key store), then "
        "connect again."
    ),
    _E.SUBNET_NOT_FOUND: (
        "A subnet of the cluster's configuration was deleted. Restore the cluster's subnets, "
        "then connect again."
    ),
    _E.INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET: (
        "A subnet of the cluster has no free address for the connection. Free addresses in the "
        "cluster's subnets, then connect again."
    ),
}


def troubleshooting(code: str | None) -> str:
    if code is None:
        return ""
    return TROUBLESHOOTING.get(code, "")


def why_not_choosable(state: str) -> str | None:
    """None for a CONNECTED store; otherwise why a key cannot be created in it now."""
    if state == ConnectionState.CONNECTED:
        return None
    if state == ConnectionState.CONNECTING:
        return "The key store is connecting; it can be chosen once it is CONNECTED."
    if state == ConnectionState.FAILED:
        return "The key store failed to connect; disconnect it, fix the cause and connect again."
    if state == ConnectionState.DISCONNECTING:
        return "The key store is disconnecting; connect it again to create keys in it."
    return "The key store is DISCONNECTED; connect it to create keys in it."
