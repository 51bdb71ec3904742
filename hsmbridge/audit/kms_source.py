"""Option (b) of the audit's metadata side: any KMS endpoint (real AWS KMS in staging) via boto3.

Owns: `KmsApiSource`, which lists a custom key store's keys the only way KMS allows it:
ListKeys (paginated), then DescribeKey on each key, keeping those whose CustomKeyStoreId (or,
without a store id, CloudHsmClusterId) matches. KMS has no server-side filter, so this costs one
DescribeKey per key in the account and region. Must not import service, protocol, http or cli.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, cast

from hsmbridge.audit.sources import KeyStatus, KnownKey, Tombstone
from hsmbridge.errors import HsmbridgeError

Progress = Callable[[str, int, int | None], None]  # (phase, done, total or None)
_LIST_PAGE = 1000  # ListKeys' maximum Limit


class KmsSourceError(HsmbridgeError):
    """The KMS endpoint refused a call (credentials, permissions, a bad reply)."""


class KmsSourceUnreachableError(KmsSourceError):
    """The KMS endpoint could not be reached (network, timeout, no credentials)."""


class KmsClient(Protocol):
    """The calls the audit makes on a boto3 KMS client."""

    exceptions: Any

    def list_keys(self, **kwargs: Any) -> Mapping[str, Any]: ...
    def describe_key(self, **kwargs: Any) -> Mapping[str, Any]: ...


def make_kms_client(region: str | None, endpoint_url: str | None) -> KmsClient:
    """A boto3 KMS client with the default credential chain (never a password from argv)."""
    # Imported lazily so audits against hsmbridge's own metadata never pay boto3's import time.
    import boto3
    from botocore.config import Config

    # Standard retries (throttling-aware for 20,000 DescribeKeys); the attempt count is left to
    # AWS_MAX_ATTEMPTS / the AWS config file so operators can tune it without a new flag.
    config = Config(retries={"mode": "standard"}, connect_timeout=5)
    # A session of our own: boto3's default session caches the first credentials it resolves
    # and is not thread-safe. cast: boto3-stubs types the client concretely; only the
    # Protocol's methods are used.
    return cast(
        KmsClient,
        boto3.session.Session().client(
            "kms", region_name=region, endpoint_url=endpoint_url, config=config
        ),
    )


class KmsApiSource:
    name = "kms"

    def __init__(
        self,
        client: KmsClient,
        *,
        custom_key_store_id: str | None,
        cluster_id: str | None,
        progress: Progress | None = None,
    ) -> None:
        if custom_key_store_id is None and cluster_id is None:
            raise ValueError("filter by a custom key store id or a cluster id")
        self._client = client
        self._store_id = custom_key_store_id
        self._cluster_id = cluster_id
        self._progress = progress

    def store_keys(self) -> list[KnownKey]:
        ids = list(self._key_ids())
        found: list[KnownKey] = []
        for done, key_id in enumerate(ids, 1):
            meta = self._describe(key_id)
            if meta is not None and self._ours(meta):
                found.append(_known(meta))
            if self._progress is not None:
                self._progress("describing KMS keys", done, len(ids))
        return found

    def lookup(self, key_id: str) -> KnownKey | None:
        meta = self._describe(key_id)
        return _known(meta) if meta is not None else None

    def tombstones(self) -> dict[str, Tombstone]:
        # NOTE: KMS keeps no queryable record of deleted keys (only CloudTrail's DeleteKey event),
        # so orphans found through this source cannot say that a deletion completed.
        return {}

    def _ours(self, meta: Mapping[str, Any]) -> bool:
        if self._store_id is not None:
            return bool(meta.get("CustomKeyStoreId") == self._store_id)
        return bool(meta.get("CloudHsmClusterId") == self._cluster_id)

    def _key_ids(self) -> Iterator[str]:
        kwargs: dict[str, Any] = {"Limit": _LIST_PAGE}
        while True:
            page = self._call(self._client.list_keys, **kwargs)
            for entry in page.get("Keys") or []:
                yield str(entry["KeyId"])
            if not page.get("Truncated"):
                return
            kwargs["Marker"] = page["NextMarker"]

    def _describe(self, key_id: str) -> Mapping[str, Any] | None:
        try:
            reply = self._call(self._client.describe_key, KeyId=key_id)
        except KmsSourceError as exc:
            if isinstance(exc.__cause__, self._client.exceptions.NotFoundException):
                return None
            raise
        meta: Mapping[str, Any] = reply["KeyMetadata"]
        return meta

    @staticmethod
    def _call(method: Callable[..., Mapping[str, Any]], **kwargs: Any) -> Mapping[str, Any]:
        import botocore.exceptions

        try:
            return method(**kwargs)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            raise KmsSourceError(
                f"KMS {exc.operation_name} failed with {error.get('Code', 'Unknown')}: "
                f"{error.get('Message', '')}"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise KmsSourceUnreachableError(f"the KMS endpoint could not be called: {exc}") from exc


def _known(meta: Mapping[str, Any]) -> KnownKey:
    state = meta.get("KeyState")
    # NOTE: KMS shows an interrupted or running CreateKey as KeyState "Creating"; it never shows
    # a key whose deletion is being finished (that key is already NotFound).
    status = KeyStatus.CREATING if state == "Creating" else KeyStatus.LIVE
    return KnownKey(
        str(meta["KeyId"]),
        str(meta["Arn"]),
        meta.get("CustomKeyStoreId"),
        meta.get("CloudHsmClusterId"),
        status,
        str(state) if state is not None else None,
    )
