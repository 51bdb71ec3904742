"""Cluster facts: which HSMs a CloudHSM cluster has, in which Availability Zones, in which state.

Owns: the `ClusterInfo`/`HsmInfo` value types, the `ClusterInventory` Protocol, and its two
implementations: `StaticInventory` (a describe-clusters JSON file, for SoftHSM and demos) and
`CloudHsmInventory` (the cloudhsmv2 `DescribeClusters` API, for staging), plus the factory that
picks one from `InventorySettings`. Both read the same document shape, so one parser
serves both.

HSMs that hsmbridge's CloudHSM v2 API creates or deletes carry one private member,
`HsmbridgeTransitionAt` (epoch seconds): the moment a `CREATE_IN_PROGRESS` HSM becomes `ACTIVE`,
or a `DELETE_IN_PROGRESS` one disappears. The parser resolves it against a clock
(`effective_hsm_state`), so every reader of the file agrees on the state without a background
thread rewriting it. botocore ignores unknown members; the API strips it anyway.

Must not import: hsmbridge.metadata, backend, service, protocol, http or cli (keystore sits
beside metadata and below service). Only `hsmbridge.errors` and `hsmbridge.config` from the core.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from hsmbridge.config import InventorySettings
from hsmbridge.errors import ConfigError, HsmbridgeError

ACTIVE = "ACTIVE"  # the one cluster and HSM state that counts as usable
CREATE_IN_PROGRESS = "CREATE_IN_PROGRESS"
DELETE_IN_PROGRESS = "DELETE_IN_PROGRESS"
# Members of a document that are hsmbridge's own, not the cloudhsmv2 model's, start with this.
PRIVATE_PREFIX = "Hsmbridge"
# On an HSM: epoch seconds at which its CREATE_IN_PROGRESS / DELETE_IN_PROGRESS state ends.
TRANSITION_AT = "HsmbridgeTransitionAt"

Clock = Callable[[], float]


class InventoryUnavailableError(HsmbridgeError):
    """The cluster inventory could not be read (API unreachable, access denied, bad reply).

    The service maps this to a retryable fault: the cluster may be fine, we just cannot see it.
    """


@dataclass(frozen=True)
class HsmInfo:
    hsm_id: str
    availability_zone: str
    state: str  # CREATE_IN_PROGRESS | ACTIVE | DEGRADED | DELETE_IN_PROGRESS | DELETED
    subnet_id: str | None = None
    eni_ip: str | None = None


@dataclass(frozen=True)
class ClusterInfo:
    cluster_id: str
    state: str  # cloudhsmv2 ClusterState value, e.g. ACTIVE, UNINITIALIZED, DEGRADED
    hsms: tuple[HsmInfo, ...]
    # AZ -> subnet id; excluded from hashing because a mapping is not hashable
    subnet_mapping: Mapping[str, str] = field(default_factory=dict, hash=False)
    cluster_certificate_pem: str | None = None
    hsm_type: str | None = None
    vpc_id: str | None = None

    @property
    def active_hsms(self) -> tuple[HsmInfo, ...]:
        return tuple(h for h in self.hsms if h.state == ACTIVE)


class ClusterInventory(Protocol):
    def describe(self, cluster_id: str) -> ClusterInfo | None:
        """The cluster's current facts, or None when no such cluster exists."""
        ...


# --- parsing the describe-clusters shape ---------------------------------------------------------


class _ShapeError(Exception):
    """A field of a describe-clusters document is missing or has the wrong type."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


_KIND_NAMES: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}


def _field(obj: Mapping[str, Any], key: str, kind: type, path: str, required: bool = True) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise _ShapeError(f"{path}.{key}", "missing required field")
        return None
    if not isinstance(value, kind):
        expected = _KIND_NAMES.get(kind, kind.__name__)
        raise _ShapeError(f"{path}.{key}", f"must be {expected}, got {type(value).__name__}")
    return value


def _transition_at(raw: Mapping[str, Any], path: str) -> float | None:
    value = raw.get(TRANSITION_AT)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _ShapeError(f"{path}.{TRANSITION_AT}", "must be a number of epoch seconds")
    return float(value)


def effective_hsm_state(raw: Mapping[str, Any], now: float | None) -> str | None:
    """The state an HSM entry of a document reads as at `now`; None when it no longer exists.

    A CREATE_IN_PROGRESS HSM whose transition time has come reads as ACTIVE, a
    DELETE_IN_PROGRESS one as gone. Without a clock (`now` None) states read as written.
    The entry must be well formed (`parse_cluster` checks that)."""
    state = str(raw.get("State"))
    at = raw.get(TRANSITION_AT)
    if now is None or at is None or now < at:
        return state
    if state == CREATE_IN_PROGRESS:
        return ACTIVE
    if state == DELETE_IN_PROGRESS:
        return None
    return state


def resolve_transitions(doc: MutableMapping[str, Any], now: float) -> None:
    """Apply due transitions to a well-formed document in place: an HSM whose creation is done
    becomes ACTIVE (its transition member dropped), one whose deletion is done is removed."""
    for cluster in doc.get("Clusters") or []:
        hsms = cluster.get("Hsms")
        if not hsms:
            continue
        kept = []
        for hsm in hsms:
            state = effective_hsm_state(hsm, now)
            if state is None:
                continue
            if state != hsm.get("State"):
                hsm["State"] = state
                hsm["StateMessage"] = "HSM created."
            if TRANSITION_AT in hsm and state not in (CREATE_IN_PROGRESS, DELETE_IN_PROGRESS):
                del hsm[TRANSITION_AT]
            kept.append(hsm)
        cluster["Hsms"] = kept


def _parse_hsm(raw: object, path: str, now: float | None) -> HsmInfo | None:
    if not isinstance(raw, dict):
        raise _ShapeError(path, f"must be an object, got {type(raw).__name__}")
    hsm_id = _field(raw, "HsmId", str, path)
    availability_zone = _field(raw, "AvailabilityZone", str, path)
    _field(raw, "State", str, path)
    _transition_at(raw, path)
    state = effective_hsm_state(raw, now)
    if state is None:
        return None
    return HsmInfo(
        hsm_id=hsm_id,
        availability_zone=availability_zone,
        state=state,
        subnet_id=_field(raw, "SubnetId", str, path, required=False),
        eni_ip=_field(raw, "EniIp", str, path, required=False),
    )


def _parse_subnets(raw: dict[str, Any] | None, path: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for az, subnet in (raw or {}).items():
        if not isinstance(subnet, str):
            raise _ShapeError(f"{path}.SubnetMapping.{az}", "must be a string subnet id")
        mapping[az] = subnet
    return mapping


def parse_cluster(raw: object, path: str = "$", now: float | None = None) -> ClusterInfo:
    """One `Cluster` object of a describe-clusters reply; raises _ShapeError naming the field.
    With `now`, HSM transitions due by then are applied (`effective_hsm_state`)."""
    if not isinstance(raw, dict):
        raise _ShapeError(path, f"must be an object, got {type(raw).__name__}")
    hsms = _field(raw, "Hsms", list, path, required=False) or []
    certs = _field(raw, "Certificates", dict, path, required=False) or {}
    # An UNINITIALIZED cluster has no certificate yet; moto reports that as "".
    cert = _field(certs, "ClusterCertificate", str, f"{path}.Certificates", required=False)
    return ClusterInfo(
        cluster_id=_field(raw, "ClusterId", str, path),
        state=_field(raw, "State", str, path),
        hsms=tuple(
            hsm
            for i, h in enumerate(hsms)
            if (hsm := _parse_hsm(h, f"{path}.Hsms[{i}]", now)) is not None
        ),
        subnet_mapping=_parse_subnets(_field(raw, "SubnetMapping", dict, path, False), path),
        cluster_certificate_pem=cert or None,
        hsm_type=_field(raw, "HsmType", str, path, required=False),
        vpc_id=_field(raw, "VpcId", str, path, required=False),
    )


def parse_clusters_document(doc: object, now: float | None = None) -> list[ClusterInfo]:
    """Every cluster of a whole `{"Clusters": [...]}` document, validated (transitions due by
    `now` applied, when given)."""
    if not isinstance(doc, dict):
        raise _ShapeError("$", f"must be an object, got {type(doc).__name__}")
    raw_clusters = _field(doc, "Clusters", list, "$")
    clusters = [parse_cluster(c, f"$.Clusters[{i}]", now) for i, c in enumerate(raw_clusters)]
    seen: set[str] = set()
    for i, cluster in enumerate(clusters):
        if cluster.cluster_id in seen:
            raise _ShapeError(f"$.Clusters[{i}].ClusterId", f"duplicate {cluster.cluster_id!r}")
        seen.add(cluster.cluster_id)
    return clusters


def load_static_document(path: Path) -> Any:
    """The JSON value of a static inventory file (ConfigError when unreadable or not JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cluster inventory {path} cannot be read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"cluster inventory {path} is not valid JSON: {exc}") from None


def parse_static_document(path: Path, doc: object, now: float | None) -> list[ClusterInfo]:
    """`parse_clusters_document`, with a shape error as the ConfigError naming `path`."""
    try:
        return parse_clusters_document(doc, now)
    except _ShapeError as exc:
        raise ConfigError(
            f"cluster inventory {path}: {exc.path}: {exc.problem} "
            "(expected the shape `aws cloudhsmv2 describe-clusters` prints)"
        ) from None


# --- implementations -----------------------------------------------------------------------------


class StaticInventory:
    """A describe-clusters JSON file, re-read at every call so that edits take effect at once.

    Operators (and tests) simulate an HSM failure or an AZ move by editing the file; no reload
    signal, no cache. The file is small, so reading it per call is cheap. `clock` (epoch
    seconds) decides which HSM transitions (`TRANSITION_AT`) are due.
    """

    def __init__(self, path: Path, clock: Clock = time.time) -> None:
        self.path = Path(path)
        self.clock = clock

    def __repr__(self) -> str:
        return f"StaticInventory({str(self.path)!r})"

    def clusters(self) -> list[ClusterInfo]:
        doc = load_static_document(self.path)
        return parse_static_document(self.path, doc, self.clock())

    def describe(self, cluster_id: str) -> ClusterInfo | None:
        return next((c for c in self.clusters() if c.cluster_id == cluster_id), None)


class _DescribeClustersClient(Protocol):
    """The one call we make on a boto3 cloudhsmv2 client."""

    def describe_clusters(self, **kwargs: Any) -> Mapping[str, Any]: ...


class CloudHsmInventory:
    """The cloudhsmv2 DescribeClusters API (staging and production)."""

    def __init__(
        self,
        region: str | None,
        endpoint_url: str | None = None,
        client: _DescribeClustersClient | None = None,
    ) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self._client = client if client is not None else _make_client(region, endpoint_url)

    def __repr__(self) -> str:
        return f"CloudHsmInventory(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    def describe(self, cluster_id: str) -> ClusterInfo | None:
        for index, raw in enumerate(self._pages(cluster_id)):
            try:
                cluster = parse_cluster(raw, f"$.Clusters[{index}]")
            except _ShapeError as exc:
                raise InventoryUnavailableError(
                    f"cloudhsmv2 DescribeClusters returned an unexpected reply for {cluster_id}: "
                    f"{exc.path}: {exc.problem}"
                ) from None
            # The filter already selects the id; checking again guards against a proxy or mock
            # that ignores filters.
            if cluster.cluster_id == cluster_id:
                return cluster
        return None

    def _pages(self, cluster_id: str) -> list[object]:
        import botocore.exceptions

        clusters: list[object] = []
        kwargs: dict[str, Any] = {"Filters": {"clusterIds": [cluster_id]}}
        try:
            while True:
                reply = self._client.describe_clusters(**kwargs)
                clusters.extend(reply.get("Clusters") or [])
                token = reply.get("NextToken")
                if not token:
                    return clusters
                kwargs["NextToken"] = token
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            raise InventoryUnavailableError(
                f"cloudhsmv2 DescribeClusters for {cluster_id} in {self.region or 'default region'}"
                f" failed with {code}: {exc.response.get('Error', {}).get('Message', '')}"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            # Covers unreachable endpoints, missing credentials and timeouts.
            raise InventoryUnavailableError(
                f"cloudhsmv2 DescribeClusters for {cluster_id} could not be called: {exc}"
            ) from exc


def _make_client(region: str | None, endpoint_url: str | None) -> _DescribeClustersClient:
    # Imported lazily so the static (SoftHSM) deployment never pays boto3's import time.
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5)
    # A session of our own: boto3's default session caches the first credentials it resolves
    # and is not thread-safe. cast: boto3-stubs types the client concretely; only the
    # Protocol's methods are used.
    return cast(
        _DescribeClustersClient,
        boto3.session.Session().client(
            "cloudhsmv2", region_name=region, endpoint_url=endpoint_url, config=config
        ),
    )


def inventory_from_settings(
    settings: InventorySettings, clock: Clock = time.time
) -> ClusterInventory:
    """The inventory named by `[inventory]` in hsmbridge.toml; `clock` resolves the static
    file's HSM transitions (pass the service's clock)."""
    if settings.provider == "static":
        if settings.path is None:
            raise ConfigError("[inventory] provider 'static' needs 'path'")
        return StaticInventory(settings.path, clock)
    if settings.provider == "cloudhsm":
        return CloudHsmInventory(settings.region, settings.endpoint_url)
    raise ConfigError(
        f"[inventory] provider must be 'static' or 'cloudhsm', got {settings.provider!r}"
    )
