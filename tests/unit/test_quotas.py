"""Request quotas: token buckets on a fake monotonic clock, both-or-neither charging of the account
and custom key store quotas, the per-process share, `[quotas]` parsing, and a thread-safety smoke
test (the one test here on the real clock, with rates too high to refill during it)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hsmbridge.config import QuotaSettings, load_settings
from hsmbridge.errors import ConfigError, ThrottlingException
from hsmbridge.ratelimit import TokenBucket
from hsmbridge.service.quotas import (
    ACCOUNT_THROTTLED,
    RequestQuotas,
    Unlimited,
    quotas_from_settings,
)
from tests.harness import FakeClock

ACCOUNT, OTHER_ACCOUNT = "111122223333", "444455556666"
STORE, OTHER_STORE = "cks-1234567890abcdef0", "cks-0fedcba0987654321"


def _admitted(
    quotas: RequestQuotas, n: int, account: str = ACCOUNT, store: str | None = STORE
) -> int:
    """How many of `n` requests at this instant pass."""
    passed = 0
    for _ in range(n):
        try:
            quotas.charge_cryptographic(account, store)
        except ThrottlingException:
            continue
        passed += 1
    return passed


# --- TokenBucket -------------------------------------------------------------------------------


def test_bucket_starts_full_with_one_seconds_worth_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(4.0, now=100.0)
    assert bucket.available(100.0) == 4.0
    for _ in range(4):
        bucket.take()
    assert bucket.available(100.0) == 0.0
    assert bucket.available(100.25) == pytest.approx(1.0)
    assert bucket.available(110.0) == 4.0  # never more than the burst


def test_bucket_below_one_per_second_still_holds_one_request() -> None:
    bucket = TokenBucket(0.5, now=0.0)
    assert bucket.available(0.0) == 1.0
    bucket.take()
    assert bucket.available(1.0) == pytest.approx(0.5)
    assert bucket.available(2.0) == pytest.approx(1.0)


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(2.0, now=10.0)
    bucket.take()
    bucket.take()
    assert bucket.available(5.0) == 0.0
    assert bucket.available(10.5) == pytest.approx(1.0)


def test_bucket_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        TokenBucket(0.0, now=0.0)


# --- RequestQuotas -----------------------------------------------------------------------------


def test_burst_then_refill_at_the_store_rate() -> None:
    clock = FakeClock(0.0)
    quotas = RequestQuotas(100.0, 3.0, clock=clock)
    assert _admitted(quotas, 10) == 3
    clock.advance(1 / 3)
    assert _admitted(quotas, 10) == 1
    clock.advance(5.0)
    assert _admitted(quotas, 10) == 3


def test_store_refusal_names_the_store() -> None:
    quotas = RequestQuotas(100.0, 1.0, clock=FakeClock(0.0))
    quotas.charge_cryptographic(ACCOUNT, STORE)
    with pytest.raises(ThrottlingException) as exc:
        quotas.charge_cryptographic(ACCOUNT, STORE)
    assert STORE in exc.value.message
    assert exc.value.code == "ThrottlingException"
    assert not exc.value.fault  # a 400, which SDKs retry by its code


def test_account_refusal_is_kms_message() -> None:
    quotas = RequestQuotas(1.0, 100.0, clock=FakeClock(0.0))
    quotas.charge_cryptographic(ACCOUNT, None)
    with pytest.raises(ThrottlingException) as exc:
        quotas.charge_cryptographic(ACCOUNT, STORE)
    assert exc.value.message == ACCOUNT_THROTTLED


def test_a_store_refusal_takes_nothing_from_the_account() -> None:
    clock = FakeClock(0.0)
    quotas = RequestQuotas(2.0, 1.0, clock=clock)
    assert _admitted(quotas, 5, store=STORE) == 1  # 4 refused by the store quota
    # The account quota spent 1 of 2, not 5: one more request through another store passes.
    assert _admitted(quotas, 5, store=OTHER_STORE) == 1


def test_an_account_refusal_takes_nothing_from_the_store() -> None:
    clock = FakeClock(0.0)
    quotas = RequestQuotas(1.0, 2.0, clock=clock)
    assert _admitted(quotas, 1, account=ACCOUNT) == 1
    assert _admitted(quotas, 5, account=ACCOUNT) == 0  # the account is out; the store untouched
    assert _admitted(quotas, 5, account=OTHER_ACCOUNT) == 1  # the store still has its 2nd token


def test_the_store_quota_is_shared_by_accounts_and_the_account_quota_by_stores() -> None:
    quotas = RequestQuotas(3.0, 2.0, clock=FakeClock(0.0))
    assert _admitted(quotas, 1, account=ACCOUNT) == 1
    assert _admitted(quotas, 5, account=OTHER_ACCOUNT) == 1  # the store's 2 are spent
    assert _admitted(quotas, 5, account=ACCOUNT, store=OTHER_STORE) == 2  # ACCOUNT's 3 are spent
    assert _admitted(quotas, 5, account=ACCOUNT, store=None) == 0


def test_thread_safety_smoke() -> None:
    # A clock that stands still: exactly the burst passes however the threads interleave.
    quotas = RequestQuotas(10_000.0, 200.0, clock=FakeClock(0.0))
    passed = [0] * 8
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        for _ in range(100):
            try:
                quotas.charge_cryptographic(ACCOUNT, STORE)
            except ThrottlingException:
                continue
            passed[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(passed) == 200
    # ...and the account was charged for exactly those: 9,800 of its 10,000 are left.
    assert _admitted(quotas, 10_000, store=None) == 9_800


# --- the per-process share and [quotas] ---------------------------------------------------------


def test_disabled_quotas_never_throttle() -> None:
    quotas = quotas_from_settings(QuotaSettings(), clock=FakeClock(0.0))
    assert isinstance(quotas, Unlimited)
    for _ in range(10_000):
        quotas.charge_cryptographic(ACCOUNT, STORE)


def test_each_process_enforces_its_share() -> None:
    settings = QuotaSettings(
        enabled=True, cryptographic_requests_per_s=40.0, custom_key_store_requests_per_s=8.0
    )
    quotas = quotas_from_settings(settings, processes=4, clock=FakeClock(0.0))
    assert isinstance(quotas, RequestQuotas)
    assert (quotas.cryptographic_per_s, quotas.custom_key_store_per_s) == (10.0, 2.0)
    assert _admitted(quotas, 10) == 2


SERVICE = '[service]\nregion = "eu-west-2"\naccount_id = "111122223333"\n'
INVENTORY = '[inventory]\nprovider = "static"\npath = "clusters.json"\n'


def _settings(tmp_path: Path, text: str, top: str = "") -> Path:
    path = tmp_path / "hsmbridge.toml"
    path.write_text(top + SERVICE + INVENTORY + text)
    return path


def test_quotas_are_off_by_default_with_kms_rates(tmp_path: Path) -> None:
    quotas = load_settings(_settings(tmp_path, "")).quotas
    assert quotas == QuotaSettings(False, 5500.0, 1800.0)


def test_quotas_table(tmp_path: Path) -> None:
    text = "[quotas]\nenabled = true\ncryptographic_requests_per_s = 20\n"
    text += "custom_key_store_requests_per_s = 2.5\n"
    assert load_settings(_settings(tmp_path, text)).quotas == QuotaSettings(True, 20.0, 2.5)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[quotas]\nenabled = "yes"\n', ["[quotas]", "'enabled'", "bool"]),
        ("[quotas]\ncryptographic_requests_per_s = 0\n", ["[quotas]", "cryptographic_requests"]),
        ("[quotas]\ncustom_key_store_requests_per_s = -1\n", ["custom_key_store_requests_per_s"]),
        ("[quotas]\ncustom_key_store_requests_per_s = nan\n", ["custom_key_store_requests_per_s"]),
        ('[quotas]\ncryptographic_requests_per_s = "5500"\n', ["must be a float"]),
    ],
)
def test_bad_quotas_name_file_table_and_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = _settings(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    for word in [str(path), *words]:
        assert word in str(exc.value)


def test_quotas_must_be_a_table(tmp_path: Path) -> None:
    path = _settings(tmp_path, "", top="quotas = 5\n")
    with pytest.raises(ConfigError, match="'quotas' must be a dict"):
        load_settings(path)
