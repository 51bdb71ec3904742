"""Request quotas in the service, on a fake HSM: `[quotas]` in hsmbridge.toml, wired by
`bootstrap.open_service` with an injected monotonic clock, charged by the cryptographic operations.

The store quota throttles Encrypt with a message naming the store until time passes; the account
quota is shared by the keys of two stores; a request is counted before authorization (as KMS
throttles before it authorizes) and a ReEncrypt once; without `[quotas] enabled` nothing throttles.
"""

from __future__ import annotations

import json

import pytest

from hsmbridge import bootstrap
from hsmbridge.errors import (
    AccessDeniedException,
    DryRunOperationException,
    InvalidKeyUsageException,
    ThrottlingException,
)
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.service.quotas import ACCOUNT_THROTTLED, Unlimited
from tests.callers import ADMIN, OUTSIDER
from tests.harness import REGION, SOFTHSM2_PROFILE, FakeClock, KmsEnv
from tests.service.steps import key_request, new_key

PLAINTEXT = b"quota"


def _reopen(env: KmsEnv, quotas: str) -> FakeClock:
    """Append `quotas` (TOML) to the env's configuration and reopen its service on a fake
    monotonic clock for the quotas, which the returned clock moves."""
    with env.config_path.open("a") as fh:
        fh.write("\n" + quotas)
    clock = FakeClock(0.0)
    env.close()
    settings = env.settings
    assert env.connector is not None
    env.service = bootstrap.open_service(
        settings,
        connector=env.connector(settings),
        clock=env.clock,
        audit=env.audit,
        synchronous_connect=True,
        quota_clock=clock,
    )
    return clock


def _enabled(crypto: float, store: float) -> str:
    return (
        f"[quotas]\nenabled = true\ncryptographic_requests_per_s = {crypto}\n"
        f"custom_key_store_requests_per_s = {store}\n"
    )


def _encrypt(env: KmsEnv, key_id: str) -> bytes:
    return env.svc.crypto.encrypt(ADMIN, key_id, PLAINTEXT).ciphertext_blob


def _second_store(env: KmsEnv) -> str:
    """Another CONNECTED store in the env's account: a second cluster on the same token."""
    cluster_id = new_cluster_id()
    pki = make_demo_pki(cluster_id)
    doc = json.loads(env.inventory_path.read_text())
    spec = DemoClusterSpec(cluster_id, pki.cluster_cert_pem, region=REGION)
    doc["Clusters"] += describe_clusters_document([spec])["Clusters"]
    env.inventory_path.write_text(json.dumps(doc))
    with env.config_path.open("a") as fh:
        fh.write(
            f'\n[[clusters]]\ncluster_id = "{cluster_id}"\nprofile = "{SOFTHSM2_PROFILE}"\n'
            f'token_label = "{env.token_label}"\n'
        )
    env.restart()
    ks = env.svc.keystores
    store_id = ks.create(ADMIN, "SecondStore", cluster_id, pki.ca_cert_pem, env.password)
    ks.connect(ADMIN, store_id)
    return store_id


def test_encrypt_over_the_store_quota_is_throttled_until_time_passes(fake_env: KmsEnv) -> None:
    key_id = new_key(fake_env)
    clock = _reopen(fake_env, _enabled(crypto=100, store=3))
    blobs = [_encrypt(fake_env, key_id) for _ in range(3)]  # the burst: one second's worth
    with pytest.raises(ThrottlingException) as exc:
        _encrypt(fake_env, key_id)
    assert fake_env.store_id is not None
    assert fake_env.store_id in exc.value.message
    assert "Reduce the frequency of your calls." in exc.value.message
    # Decrypt shares the quota.
    with pytest.raises(ThrottlingException):
        fake_env.svc.crypto.decrypt(ADMIN, blobs[0])
    clock.advance(1 / 3)  # one request's worth
    assert fake_env.svc.crypto.decrypt(ADMIN, blobs[0]).plaintext == PLAINTEXT
    with pytest.raises(ThrottlingException):
        _encrypt(fake_env, key_id)
    clock.advance(1.0)
    assert len({_encrypt(fake_env, key_id) for _ in range(3)}) == 3


def test_the_account_quota_is_shared_by_the_keys_of_two_stores(fake_env: KmsEnv) -> None:
    first = new_key(fake_env)
    second_store = _second_store(fake_env)
    request = key_request(fake_env, custom_key_store_id=second_store)
    second = fake_env.svc.keys.create(ADMIN, request).key_id
    clock = _reopen(fake_env, _enabled(crypto=4, store=100))
    for key_id in (first, second, first, second):
        _encrypt(fake_env, key_id)
    for key_id in (first, second):
        with pytest.raises(ThrottlingException) as exc:
            _encrypt(fake_env, key_id)
        assert exc.value.message == ACCOUNT_THROTTLED
    # GenerateRandom counts against the account quota too, with or without a store.
    with pytest.raises(ThrottlingException):
        fake_env.svc.crypto.generate_random(ADMIN, 8, None)
    with pytest.raises(ThrottlingException):
        fake_env.svc.crypto.generate_random(ADMIN, 8, second_store)
    clock.advance(0.5)
    _encrypt(fake_env, second)
    assert fake_env.svc.crypto.generate_random(ADMIN, 8, None)


def test_counted_before_authorization_dry_run_and_key_usage(fake_env: KmsEnv) -> None:
    key_id = new_key(fake_env)
    arn = fake_env.svc.keys.describe(ADMIN, key_id).arn
    _reopen(fake_env, _enabled(crypto=100, store=4))
    with pytest.raises(AccessDeniedException):  # another account's caller, still counted
        fake_env.svc.crypto.encrypt(OUTSIDER, arn, PLAINTEXT)
    with pytest.raises(DryRunOperationException):
        fake_env.svc.crypto.encrypt(ADMIN, key_id, PLAINTEXT, dry_run=True)
    with pytest.raises(InvalidKeyUsageException):
        fake_env.svc.crypto.refuse_key_usage(ADMIN, key_id, "Sign")
    _encrypt(fake_env, key_id)
    with pytest.raises(ThrottlingException):
        _encrypt(fake_env, key_id)


def test_re_encrypt_counts_once(fake_env: KmsEnv) -> None:
    key_id = new_key(fake_env)
    clock = _reopen(fake_env, _enabled(crypto=100, store=2))
    blob = _encrypt(fake_env, key_id)
    fake_env.svc.crypto.re_encrypt(ADMIN, blob, key_id)  # the store's 2nd request, not 2nd and 3rd
    with pytest.raises(ThrottlingException):
        fake_env.svc.crypto.re_encrypt(ADMIN, blob, key_id)
    clock.advance(0.5)
    assert fake_env.svc.crypto.re_encrypt(ADMIN, blob, key_id).key_arn


def test_generate_data_key_and_random_charge_the_store(fake_env: KmsEnv) -> None:
    key_id = new_key(fake_env)
    _reopen(fake_env, _enabled(crypto=100, store=2))
    fake_env.svc.crypto.generate_data_key(ADMIN, key_id, key_spec="AES_256")
    fake_env.svc.crypto.generate_random(ADMIN, 8, fake_env.store_id)
    with pytest.raises(ThrottlingException):
        fake_env.svc.crypto.generate_data_key(ADMIN, key_id, key_spec="AES_256")
    assert fake_env.svc.crypto.generate_random(ADMIN, 8, None)  # no store: the account only


def test_without_quotas_enabled_nothing_is_throttled(fake_env: KmsEnv) -> None:
    key_id = new_key(fake_env)
    # Tiny rates, but not enabled: the configuration alone throttles nothing.
    clock = _reopen(fake_env, "[quotas]\ncryptographic_requests_per_s = 1\n")
    assert isinstance(fake_env.svc.ctx.quotas, Unlimited)
    for _ in range(20):
        blob = _encrypt(fake_env, key_id)
        fake_env.svc.crypto.decrypt(ADMIN, blob)
    assert clock.now == 0.0
