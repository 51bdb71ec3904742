"""KMS request quotas for cryptographic operations, answered with ThrottlingException.

Owns: `RequestQuotas` (the account quota for cryptographic operations and the per-custom-key-store
quota, charged together, each a `ratelimit.TokenBucket`: rate r per second, burst r), `Unlimited`
(the disabled quota, a no-op) and `quotas_from_settings`, which picks one from `[quotas]`.

Design:
* KMS charges the calling account's "cryptographic operations (symmetric) request rate" and, for a
  key in an AWS CloudHSM key store, that store's request quota too; a request either fits both or
  is throttled without consuming either, so a refused request never eats into the other quota.
* One lock and a few float operations per request: this runs before every cryptographic
  operation. Buckets are made once per account or store (both bounded: authenticated accounts,
  stores that exist) and never on the refusal path of a known one.
* Each server process keeps its own buckets, so `RequestQuotas` enforces the configured rates
  divided by the number of server processes it is told share the endpoint.
Must not import protocol, http or cli.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, Protocol

from hsmbridge.config import QuotaSettings
from hsmbridge.errors import ThrottlingException
from hsmbridge.ratelimit import TokenBucket

MonotonicClock = Callable[[], float]

ACCOUNT_THROTTLED: Final = (
    "You have exceeded the rate at which you may call KMS. Reduce the frequency of your calls."
)


def store_throttled_message(store_id: str) -> str:
    return (
        "You have exceeded the rate at which you may call KMS: the request quota of custom key "
        f"store {store_id} is exceeded. Reduce the frequency of your calls."
    )


class Quotas(Protocol):
    def charge_cryptographic(self, account_id: str, custom_key_store_id: str | None) -> None:
        """Count one cryptographic request, or raise ThrottlingException and count nothing."""
        ...


class Unlimited:
    """Quotas off (the default): nothing is counted and nothing is throttled."""

    __slots__ = ()

    def charge_cryptographic(self, account_id: str, custom_key_store_id: str | None) -> None:
        return


class RequestQuotas:
    """The account and custom key store quotas of one process; thread-safe."""

    def __init__(
        self,
        cryptographic_per_s: float,
        custom_key_store_per_s: float,
        *,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        if not (cryptographic_per_s > 0 and custom_key_store_per_s > 0):
            raise ValueError("request quotas must be positive rates")
        self.cryptographic_per_s = cryptographic_per_s
        self.custom_key_store_per_s = custom_key_store_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, TokenBucket] = {}
        self._stores: dict[str, TokenBucket] = {}

    def charge_cryptographic(self, account_id: str, custom_key_store_id: str | None) -> None:
        """One request of the calling account, on a key of `custom_key_store_id` (None: no store,
        e.g. GenerateRandom without CustomKeyStoreId). The store is checked first: when both are
        exhausted the message names the store, the narrower cause."""
        with self._lock:
            now = self._clock()
            account = self._accounts.get(account_id)
            if account is None:
                account = self._accounts[account_id] = TokenBucket(self.cryptographic_per_s, now)
            if custom_key_store_id is None:
                if account.available(now) < 1.0:
                    raise ThrottlingException(ACCOUNT_THROTTLED)
                account.take()
                return
            store = self._stores.get(custom_key_store_id)
            if store is None:
                store = self._stores[custom_key_store_id] = TokenBucket(
                    self.custom_key_store_per_s, now
                )
            if store.available(now) < 1.0:
                raise ThrottlingException(store_throttled_message(custom_key_store_id))
            if account.available(now) < 1.0:
                raise ThrottlingException(ACCOUNT_THROTTLED)
            store.take()
            account.take()


def quotas_from_settings(
    settings: QuotaSettings, *, processes: int = 1, clock: MonotonicClock = time.monotonic
) -> Quotas:
    """`[quotas]` as this process enforces it: Unlimited when off, else each rate / `processes`
    (the server processes sharing the endpoint, each with its own buckets)."""
    if not settings.enabled:
        return Unlimited()
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    return RequestQuotas(
        settings.cryptographic_requests_per_s / processes,
        settings.custom_key_store_requests_per_s / processes,
        clock=clock,
    )
