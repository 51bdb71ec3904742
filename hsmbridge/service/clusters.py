"""Reading the cluster inventory from the service: one place for its errors, and a short cache
for the cryptographic hot path.

Owns: `ClusterFacts`, and the one place a quorum verdict becomes a KMS error. Management
operations (create/connect/update a store, CreateKey) read the inventory fresh, because their
answer decides what is created. Cryptographic operations need only "does the cluster still have an
ACTIVE HSM" on every request, so that answer is cached for a couple of seconds instead
of re-reading a file or calling DescribeClusters per request.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hsmbridge import nowait
from hsmbridge.errors import (
    CloudHsmClusterInvalidConfigurationException,
    CloudHsmClusterNotActiveException,
    ConfigError,
    DependencyTimeoutException,
    KmsError,
    KMSInternalException,
    KMSInvalidStateException,
)
from hsmbridge.keystore import quorum
from hsmbridge.keystore.inventory import ClusterInfo, ClusterInventory, InventoryUnavailableError

CRYPTO_CHECK_TTL_S = 2.0


class ClusterFacts:
    def __init__(
        self,
        inventory: ClusterInventory,
        ttl_s: float = CRYPTO_CHECK_TTL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inventory = inventory
        self._ttl = ttl_s
        self._monotonic = monotonic
        self._active: dict[str, tuple[float, int]] = {}  # cluster id -> (checked at, ACTIVE HSMs)
        self._lock = threading.Lock()

    def describe(self, cluster_id: str) -> ClusterInfo | None:
        """A fresh read; inventory failures become the KMS errors a client can act on."""
        try:
            return self._inventory.describe(cluster_id)
        except InventoryUnavailableError as exc:
            raise DependencyTimeoutException(
                f"The CloudHSM cluster inventory could not be read: {exc}"
            ) from exc
        except ConfigError as exc:
            raise KMSInternalException(
                f"The cluster inventory of this endpoint is misconfigured: {exc}"
            ) from exc

    def require_quorum(self, op: quorum.Operation, cluster: ClusterInfo) -> None:
        """The AZ-quorum rule of `op`, as the KMS error that operation lists: the
        store operations distinguish a cluster that is not ACTIVE; CreateKey's model lists only
        CloudHsmClusterInvalidConfigurationException."""
        verdict = quorum.check(op, cluster)
        if verdict.ok:
            return
        if verdict.reason is quorum.Reason.NOT_ACTIVE and op is not quorum.Operation.CREATE_KEY:
            raise CloudHsmClusterNotActiveException(verdict.message)
        raise CloudHsmClusterInvalidConfigurationException(verdict.message)

    def require_active_hsm(
        self,
        cluster_id: str,
        subject: str,
        error: type[KmsError] = KMSInvalidStateException,
    ) -> None:
        """Spec §3.7/§7: cryptography needs at least one ACTIVE HSM in the key's cluster."""
        now = self._monotonic()
        cached = self._active.get(cluster_id)
        if cached is None or now - cached[0] > self._ttl:
            nowait.refuse("reading the cluster inventory")  # a file, or the CloudHSM API
            cluster = self.describe(cluster_id)
            count = len(cluster.active_hsms) if cluster is not None else 0
            with self._lock:
                self._active[cluster_id] = cached = (now, count)
        if cached[1] == 0:
            raise error(
                f"KMS cannot communicate with your CloudHSM cluster: cluster {cluster_id} of "
                f"{subject} has no ACTIVE HSM."
            )

    def forget(self, cluster_id: str) -> None:
        with self._lock:
            self._active.pop(cluster_id, None)
