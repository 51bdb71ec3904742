"""The CloudHSM v2 API over the static cluster inventory: what `aws cloudhsmv2` needs of the seed.

Owns: `CloudHsmService`, one method per cloudhsmv2 operation hsmbridge serves (DescribeClusters,
CreateHsm, DeleteHsm, ListTags, TagResource, UntagResource), each taking the caller's
`RequestContext` first and asking IAM (`ctx.authorize`, action `cloudhsm:NAME`, the cluster ARN
as resource) before it acts. The inventory file (`keystore.inventory_file.InventoryFile`) is the
only state: every change is one locked read-modify-write of it, so the KMS quorum checks, which
read the same file, see each change at once. HSM creation and deletion take
`transition_delay_s`: the entry records when its CREATE_IN_PROGRESS / DELETE_IN_PROGRESS state
ends and every reader resolves that against its clock.

Results are the cloudhsmv2 model's shapes as dicts (`Cluster`, `Hsm`, `Tag`) with `datetime`
timestamps and without hsmbridge's private members; the protocol layer serialises them. Errors
are the model's (`hsmbridge.errors.CloudHsm*Exception`); refusals by IAM stay
AccessDeniedException, which the protocol renames.

NOTE: one endpoint keeps the clusters of its configured account; principals of other accounts
see none (an empty DescribeClusters, CloudHsmResourceNotFoundException otherwise).
Must not import protocol, http or cli.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import json
import secrets
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from hsmbridge.errors import (
    CloudHsmInternalFailureException,
    CloudHsmInvalidRequestException,
    CloudHsmResourceLimitExceededException,
    CloudHsmResourceNotFoundException,
    CloudHsmTagException,
    ConfigError,
)
from hsmbridge.keystore.inventory import (
    CREATE_IN_PROGRESS,
    DELETE_IN_PROGRESS,
    PRIVATE_PREFIX,
    TRANSITION_AT,
)
from hsmbridge.keystore.inventory_file import InventoryFile
from hsmbridge.request import RequestContext
from hsmbridge.service.context import ServiceContext

FILTERS: Final = ("clusterIds", "states", "vpcIds")
CLUSTERS_MAX_RESULTS: Final = 25  # the model's ClustersMaxSize
TAGS_MAX_RESULTS: Final = 100  # the model's MaxSize
TAGS_PER_LIST: Final = 50  # TagList / TagKeyList max
TAGS_PER_CLUSTER: Final = 50  # CloudHSM quota: tags per resource
# Clusters that take new HSMs: before initialisation too (CloudHSM's setup creates the first HSM
# of an UNINITIALIZED cluster), never while one is being created, changed or deleted.
CREATE_HSM_STATES: Final = frozenset({"UNINITIALIZED", "INITIALIZED", "ACTIVE", "DEGRADED"})
TIMESTAMP_MEMBERS: Final = ("CreateTimestamp", "HsmTypeRollbackExpiration")

_ID_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"  # cloudhsmv2 ids: [2-7a-z]
_RESERVED_TAG_PREFIX: Final = "aws:"

T = TypeVar("T")


class CloudHsmService:
    def __init__(
        self, ctx: ServiceContext, inventory_file: InventoryFile, *, transition_delay_s: float
    ) -> None:
        if transition_delay_s < 0:
            raise ValueError("transition_delay_s must be >= 0")
        self.ctx = ctx
        self.inventory_file = inventory_file
        self.transition_delay_s = transition_delay_s

    # --- operations ------------------------------------------------------------------------

    def describe_clusters(
        self,
        caller: RequestContext,
        *,
        filters: Mapping[str, Sequence[str]] | None,
        max_results: int | None,
        next_token: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.ctx.authorize(caller, "cloudhsm:DescribeClusters", None)
        _check_max_results(max_results, CLUSTERS_MAX_RESULTS)
        wanted = _check_filters(filters)
        start = _decode_token(next_token, "DescribeClusters")
        if self.ctx.is_foreign(caller):
            return [], None
        clusters = [
            c for c in self._read()["Clusters"] if all(_matches(c, f, v) for f, v in wanted)
        ]
        page, token = _page(clusters, start, max_results)
        return [_published(c) for c in page], token

    def create_hsm(
        self,
        caller: RequestContext,
        cluster_id: str,
        availability_zone: str,
        ip_address: str | None,
    ) -> dict[str, Any]:
        self._authorize(caller, "CreateHsm", cluster_id)
        now = self.ctx.clock()

        def change(doc: dict[str, Any]) -> dict[str, Any]:
            cluster = _cluster(doc, cluster_id)
            state = cluster.get("State")
            if state not in CREATE_HSM_STATES:
                raise CloudHsmInvalidRequestException(
                    f"Cannot create an HSM in cluster {cluster_id} while it is {state}."
                )
            mapping: Mapping[str, str] = cluster.get("SubnetMapping") or {}
            subnet_id = mapping.get(availability_zone)
            if subnet_id is None:
                raise CloudHsmInvalidRequestException(
                    f"Availability Zone {availability_zone} is not in the subnet mapping of "
                    f"cluster {cluster_id} (its zones: {', '.join(sorted(mapping)) or 'none'})."
                )
            hsms: list[dict[str, Any]] = cluster.get("Hsms") or []
            cluster["Hsms"] = hsms
            network = _subnet_network(cluster, availability_zone)
            taken = {h["EniIp"] for h in hsms if isinstance(h.get("EniIp"), str)}
            eni_ip = _choose_ip(network, taken, ip_address, subnet_id)
            hsm = {
                "AvailabilityZone": availability_zone,
                "ClusterId": cluster_id,
                "SubnetId": subnet_id,
                "EniId": _new_eni_id(doc),
                "EniIp": eni_ip,
                "HsmId": _new_hsm_id(doc),
                "State": CREATE_IN_PROGRESS,
                "StateMessage": "HSM is being created.",
                TRANSITION_AT: now + self.transition_delay_s,
            }
            if isinstance(cluster.get("HsmType"), str):
                hsm["HsmType"] = cluster["HsmType"]
            hsms.append(hsm)
            return hsm

        return _published_hsm(self._update(change))

    def delete_hsm(
        self,
        caller: RequestContext,
        cluster_id: str,
        *,
        hsm_id: str | None,
        eni_id: str | None,
        eni_ip: str | None,
    ) -> str:
        given = [(m, v) for m, v in (("HsmId", hsm_id), ("EniId", eni_id), ("EniIp", eni_ip)) if v]
        if len(given) != 1:
            raise CloudHsmInvalidRequestException(
                "Specify exactly one of HsmId, EniId and EniIp to identify the HSM to delete."
            )
        member, value = given[0]
        self._authorize(caller, "DeleteHsm", cluster_id)
        now = self.ctx.clock()

        def change(doc: dict[str, Any]) -> str:
            cluster = _cluster(doc, cluster_id)
            hsm = next((h for h in cluster.get("Hsms") or [] if h.get(member) == value), None)
            if hsm is None:
                raise CloudHsmResourceNotFoundException(
                    f"No HSM with {member} {value} in cluster {cluster_id}."
                )
            if hsm.get("State") != DELETE_IN_PROGRESS:  # a repeated delete changes nothing
                hsm["State"] = DELETE_IN_PROGRESS
                hsm["StateMessage"] = "HSM is being deleted."
                hsm[TRANSITION_AT] = now + self.transition_delay_s
            return str(hsm["HsmId"])

        return self._update(change)

    def list_tags(
        self,
        caller: RequestContext,
        resource_id: str,
        *,
        next_token: str | None,
        max_results: int | None,
    ) -> tuple[list[dict[str, str]], str | None]:
        self._authorize(caller, "ListTags", resource_id)
        _check_max_results(max_results, TAGS_MAX_RESULTS)
        start = _decode_token(next_token, "ListTags")
        cluster = _cluster(self._read(), resource_id)
        tags = [_tag(t) for t in cluster.get("TagList") or []]
        return _page(tags, start, max_results)

    def tag_resource(
        self, caller: RequestContext, resource_id: str, tags: Sequence[Mapping[str, str]]
    ) -> None:
        self._authorize(caller, "TagResource", resource_id)
        new = _check_tags(tags)

        def change(doc: dict[str, Any]) -> None:
            cluster = _cluster(doc, resource_id)
            merged = {t["Key"]: t["Value"] for t in map(_tag, cluster.get("TagList") or [])}
            merged.update(new)
            if len(merged) > TAGS_PER_CLUSTER:
                raise CloudHsmResourceLimitExceededException(
                    f"Cluster {resource_id} would have {len(merged)} tags; a resource can have "
                    f"at most {TAGS_PER_CLUSTER}."
                )
            cluster["TagList"] = [{"Key": k, "Value": v} for k, v in merged.items()]

        self._update(change)

    def untag_resource(self, caller: RequestContext, resource_id: str, keys: Sequence[str]) -> None:
        self._authorize(caller, "UntagResource", resource_id)
        if not 1 <= len(keys) <= TAGS_PER_LIST:
            raise CloudHsmInvalidRequestException(
                f"TagKeyList must have 1 to {TAGS_PER_LIST} keys, got {len(keys)}."
            )
        for key in keys:
            _check_tag_key(key)
        gone = set(keys)

        def change(doc: dict[str, Any]) -> None:
            cluster = _cluster(doc, resource_id)
            # Keys the cluster does not have are ignored, as by AWS.
            tags = map(_tag, cluster.get("TagList") or [])
            cluster["TagList"] = [t for t in tags if t["Key"] not in gone]

        self._update(change)

    # --- helpers ---------------------------------------------------------------------------

    def cluster_arn(self, cluster_id: str) -> str:
        s = self.ctx.settings
        return f"arn:{s.partition}:cloudhsm:{s.region}:{s.account_id}:cluster/{cluster_id}"

    def _authorize(self, caller: RequestContext, operation: str, cluster_id: str) -> None:
        """IAM first (as AWS: an unauthorized caller learns nothing about the resource), then
        the account: another account's principal finds no cluster here."""
        self.ctx.authorize(caller, f"cloudhsm:{operation}", self.cluster_arn(cluster_id))
        if self.ctx.is_foreign(caller):
            raise _not_found(cluster_id)

    def _read(self) -> dict[str, Any]:
        try:
            return self.inventory_file.read()
        except ConfigError as exc:
            raise CloudHsmInternalFailureException(
                f"The cluster inventory of this endpoint cannot be read: {exc}"
            ) from exc

    def _update(self, change: Callable[[dict[str, Any]], T]) -> T:
        try:
            return self.inventory_file.update(change)
        except ConfigError as exc:
            raise CloudHsmInternalFailureException(
                f"The cluster inventory of this endpoint cannot be changed: {exc}"
            ) from exc


# --- documents -------------------------------------------------------------------------------


def _not_found(cluster_id: str) -> CloudHsmResourceNotFoundException:
    return CloudHsmResourceNotFoundException(f"Cluster {cluster_id} does not exist.")


def _cluster(doc: Mapping[str, Any], cluster_id: str) -> dict[str, Any]:
    for cluster in doc.get("Clusters") or []:
        if cluster.get("ClusterId") == cluster_id:
            found: dict[str, Any] = cluster
            return found
    raise _not_found(cluster_id)


def _tag(stored: Mapping[str, Any]) -> dict[str, str]:
    """A `Tag` of a document's TagList (a hand-edited one may lack members)."""
    return {"Key": str(stored.get("Key", "")), "Value": str(stored.get("Value", ""))}


def _without_private(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith(PRIVATE_PREFIX)}


def _timestamp(value: object) -> datetime | None:
    """A document timestamp (epoch seconds, or the ISO 8601 text the aws-cli prints)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return None


def _published_hsm(hsm: dict[str, Any]) -> dict[str, Any]:
    return _without_private(copy.deepcopy(hsm))


def _published(cluster: dict[str, Any]) -> dict[str, Any]:
    """A cluster as the model's `Cluster` shape: no private members, datetime timestamps."""
    out = _without_private(copy.deepcopy(cluster))
    out["Hsms"] = [_without_private(h) for h in out.get("Hsms") or []]
    for member in TIMESTAMP_MEMBERS:
        if member in out:
            when = _timestamp(out[member])
            if when is None:
                del out[member]  # unreadable: better absent than a value the SDK rejects
            else:
                out[member] = when
    return out


def _matches(cluster: Mapping[str, Any], member: str, values: frozenset[str]) -> bool:
    return cluster.get(member) in values


# --- request checks ------------------------------------------------------------------------


_FILTER_MEMBERS: Final = {"clusterIds": "ClusterId", "states": "State", "vpcIds": "VpcId"}


def _check_filters(
    filters: Mapping[str, Sequence[str]] | None,
) -> list[tuple[str, frozenset[str]]]:
    """(document member, accepted values) per filter; every filter must match."""
    wanted: list[tuple[str, frozenset[str]]] = []
    for name, values in (filters or {}).items():
        member = _FILTER_MEMBERS.get(name)
        if member is None:
            raise CloudHsmInvalidRequestException(
                f"Unknown filter {name!r}; DescribeClusters filters by {', '.join(FILTERS)}."
            )
        wanted.append((member, frozenset(values)))
    return wanted


def _check_max_results(max_results: int | None, limit: int) -> None:
    if max_results is not None and not 1 <= max_results <= limit:
        raise CloudHsmInvalidRequestException(
            f"MaxResults must be between 1 and {limit}, got {max_results}."
        )


def _page(items: list[T], start: int, max_results: int | None) -> tuple[list[T], str | None]:
    start = min(start, len(items))  # the list shrank since the token was issued
    end = len(items) if max_results is None else start + max_results
    return items[start:end], (_encode_token(end) if end < len(items) else None)


def _encode_token(offset: int) -> str:
    raw = json.dumps({"offset": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _decode_token(token: str | None, operation: str) -> int:
    if token is None:
        return 0
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        offset = value["offset"]
    except (ValueError, TypeError, KeyError, UnicodeEncodeError, binascii.Error):
        offset = None
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CloudHsmInvalidRequestException(f"The NextToken of this {operation} is not valid.")
    return offset


def _tag_text(text: str) -> bool:
    """The model's tag pattern: letters, separators (spaces), numbers and `_.:/=+-@`."""
    return all(
        ch.isalnum() or ch in "_.:/=+-@" or unicodedata.category(ch).startswith("Z") for ch in text
    )


def _check_tag_key(key: object) -> None:
    if not isinstance(key, str) or not 1 <= len(key) <= 128 or not _tag_text(key):
        raise CloudHsmInvalidRequestException(
            f"Tag key {key!r} must be 1 to 128 letters, digits, spaces or _.:/=+-@."
        )


def _check_tags(tags: Sequence[Mapping[str, str]]) -> dict[str, str]:
    if not 1 <= len(tags) <= TAGS_PER_LIST:
        raise CloudHsmInvalidRequestException(
            f"TagList must have 1 to {TAGS_PER_LIST} tags, got {len(tags)}."
        )
    new: dict[str, str] = {}
    for tag in tags:
        key, value = tag.get("Key"), tag.get("Value")
        _check_tag_key(key)
        assert isinstance(key, str)
        if not isinstance(value, str) or len(value) > 256 or not _tag_text(value):
            raise CloudHsmInvalidRequestException(
                f"The value of tag {key!r} must be up to 256 letters, digits, spaces or _.:/=+-@."
            )
        if key.lower().startswith(_RESERVED_TAG_PREFIX):
            raise CloudHsmTagException(f"Tag key {key!r}: the prefix 'aws:' is reserved by AWS.")
        new[key] = value
    return new


# --- addresses and identifiers -------------------------------------------------------------


def _subnet_network(cluster: Mapping[str, Any], availability_zone: str) -> ipaddress.IPv4Network:
    """The (invented) IPv4 CIDR of the cluster's subnet in `availability_zone`: the /24 of an
    HSM already in it, else 10.0.N.0/24 with N the zone's place among the mapping's sorted
    zones (what `keystore.demo` uses), else the first 10.0.N.0/24 no other subnet uses."""
    mapping: Mapping[str, str] = cluster.get("SubnetMapping") or {}
    hsms = [h for h in cluster.get("Hsms") or [] if isinstance(h.get("EniIp"), str)]

    def observed(az: str) -> ipaddress.IPv4Network | None:
        subnet = mapping.get(az)
        for hsm in hsms:
            if hsm.get("SubnetId") == subnet or hsm.get("AvailabilityZone") == az:
                try:
                    return ipaddress.IPv4Network(f"{hsm['EniIp']}/24", strict=False)
                except ValueError:
                    continue
        return None

    own = observed(availability_zone)
    if own is not None:
        return own
    used = {net for az in mapping if az != availability_zone and (net := observed(az))}
    zones = sorted(mapping)
    first = zones.index(availability_zone) if availability_zone in zones else 0
    for n in [first, *range(256)]:
        candidate = ipaddress.IPv4Network(f"10.0.{n}.0/24")
        if candidate not in used:
            return candidate
    raise CloudHsmInternalFailureException("No free address range is left for a new subnet.")


def _choose_ip(
    network: ipaddress.IPv4Network, taken: set[str], requested: str | None, subnet_id: str
) -> str:
    # AWS reserves the first four addresses of a subnet and the last one.
    usable = list(network.hosts())[3:]
    if requested is not None:
        try:
            address = ipaddress.IPv4Address(requested)
        except ValueError:
            raise CloudHsmInvalidRequestException(
                f"IpAddress {requested!r} is not an IPv4 address."
            ) from None
        if address not in usable:
            raise CloudHsmInvalidRequestException(
                f"IpAddress {requested} is not an available address of subnet {subnet_id} "
                f"({network}; the first four addresses and the last are reserved)."
            )
        if str(address) in taken:
            raise CloudHsmInvalidRequestException(
                f"IpAddress {requested} is already in use in subnet {subnet_id}."
            )
        return str(address)
    for address in usable:
        if str(address) not in taken:
            return str(address)
    raise CloudHsmInvalidRequestException(f"Subnet {subnet_id} ({network}) has no free address.")


def _all_hsms(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [h for c in doc.get("Clusters") or [] for h in c.get("Hsms") or []]


def _new_hsm_id(doc: Mapping[str, Any]) -> str:
    used = {h.get("HsmId") for h in _all_hsms(doc)}
    while True:
        hsm_id = "hsm-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))
        if hsm_id not in used:
            return hsm_id


def _new_eni_id(doc: Mapping[str, Any]) -> str:
    used = {h.get("EniId") for h in _all_hsms(doc)}
    while True:
        eni_id = "eni-" + secrets.token_hex(9)[:17]
        if eni_id not in used:
            return eni_id
