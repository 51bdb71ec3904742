"""Token buckets: a rate with one second's worth of burst, on a clock the caller passes in.

Owns: `TokenBucket`. Used where hsmbridge limits a rate: KMS's request quotas
(`service.quotas`) and the audit trail's budget for unauthenticated requests (`trail.sinks`).
Must not import anything from hsmbridge.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second up to one second's worth (at least one token, so a rate below 1/s
    still lets a request through now and then); starts full.

    Not locked: the owner serialises every call (RequestQuotas holds one lock over all buckets,
    so a two-bucket charge is atomic)."""

    __slots__ = ("_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate!r}")
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self._tokens = self.capacity
        self._stamp = now

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now`, after refilling for the time since the last call."""
        # A clock that steps back (only a test clock can) refills nothing rather than draining.
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._tokens

    def take(self) -> None:
        """Consume one token; the caller has just seen `available(now) >= 1`."""
        self._tokens -= 1.0
