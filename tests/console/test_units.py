"""The console's pure parts without a browser: session cookies, CSRF tokens, wizard rules."""

from __future__ import annotations

import base64
import json

from hsmbridge.console.session import SessionCodec, console_key
from hsmbridge.console.signin_throttle import SignInThrottle
from hsmbridge.console.wizard import WizardState, apply, check_step, error_step, refresh_policy
from hsmbridge.metadata.sqlite import SqliteMetadataStore
from hsmbridge.policy.console import console_key_policy

KEY = console_key(b"k" * 32)


class Clock:
    now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_cookie_is_signed_expires_and_ends_at_sign_out() -> None:
    clock = Clock()
    codec = SessionCodec(KEY, lifetime_s=60, clock=clock)
    session, cookie = codec.issue("AKIAEXAMPLE000000001", "arn:aws:iam::111122223333:user/a")
    assert codec.verify(cookie) == session
    version, _payload, mac = cookie.split(".")
    forged = json.dumps(
        {"k": "AKIAOTHER", "p": "arn:aws:iam::111122223333:root", "e": 9e9, "n": "x"}
    )
    forged_b64 = base64.urlsafe_b64encode(forged.encode()).rstrip(b"=").decode()
    assert codec.verify(f"{version}.{forged_b64}.{mac}") is None
    assert codec.verify(cookie + "x") is None
    assert codec.verify("garbage") is None
    assert SessionCodec(console_key(b"o" * 32), clock=clock).verify(cookie) is None  # other key
    clock.now += 61
    assert codec.verify(cookie) is None  # expired
    clock.now -= 61
    codec.revoke(session)
    assert codec.verify(cookie) is None  # signed out


def test_a_sign_out_through_one_worker_ends_the_session_in_every_worker(tmp_path) -> None:
    # Two workers: two codecs over their own connections to one metadata file, as `serve
    # --workers 2` has them. A session signed out in one is refused by the other.
    stores = [SqliteMetadataStore(tmp_path / "metadata.db") for _ in range(2)]
    try:
        signing_in, other = (SessionCodec(KEY, sign_outs=s) for s in stores)
        session, cookie = signing_in.issue("AKIAEXAMPLE000000001", "arn:aws:iam::1:user/a")
        assert other.verify(cookie) == session
        other.revoke(session)
        assert signing_in.verify(cookie) is None
        assert other.verify(cookie) is None
        # Only that session: a new sign-in of the same user is a new session.
        again, cookie = signing_in.issue("AKIAEXAMPLE000000001", "arn:aws:iam::1:user/a")
        assert other.verify(cookie) == again
    finally:
        for s in stores:
            s.close()


def test_failed_sign_ins_lock_a_key_and_then_an_address_for_the_window() -> None:
    clock = Clock()
    throttle = SignInThrottle(max_key_failures=3, max_address_failures=5, window_s=60, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1", "AKIAONE") == 0
        throttle.failed("10.0.0.1", "AKIAONE")
        clock.now += 1
    assert throttle.retry_after("10.0.0.1", "AKIAONE") == 57  # t=3; the first one leaves at 60
    assert throttle.retry_after("10.0.0.2", "AKIAONE") == 57  # the key, from anywhere
    assert throttle.retry_after("10.0.0.1", "AKIATWO") == 0  # the address allows more
    throttle.failed("10.0.0.1", "AKIATWO")
    throttle.failed("10.0.0.1", "AKIATHREE")
    assert throttle.retry_after("10.0.0.1", "AKIAFOUR") == 57  # 5 from one address
    assert throttle.retry_after("10.0.0.3", "AKIAFOUR") == 0
    clock.now += 58
    assert throttle.retry_after("10.0.0.1", "AKIAONE") == 0  # the window moved on


def test_the_throttle_forgets_the_least_recent_beyond_its_size() -> None:
    clock = Clock()
    throttle = SignInThrottle(max_key_failures=1, max_tracked=4, clock=clock)
    throttle.failed("10.0.0.1", "AKIAOLD")
    for i in range(3):
        throttle.failed(f"10.0.1.{i}", f"AKIANEW{i}")  # 8 names tracked, 4 kept
    assert throttle.retry_after("10.0.0.9", "AKIAOLD") == 0
    assert throttle.retry_after("10.0.0.9", "AKIANEW2") > 0


def test_csrf_tokens_belong_to_one_session() -> None:
    codec = SessionCodec(KEY)
    one, _ = codec.issue("AKIAEXAMPLE000000001", "arn:aws:iam::111122223333:user/a")
    two, _ = codec.issue("AKIAEXAMPLE000000001", "arn:aws:iam::111122223333:user/a")
    token = codec.csrf_token(one.nonce)
    assert codec.csrf_ok(one.nonce, token)
    assert not codec.csrf_ok(two.nonce, token)
    assert not codec.csrf_ok(one.nonce, None)
    assert not codec.csrf_ok(one.nonce, "")


def test_wizard_state_survives_the_hidden_field_and_checks_each_step() -> None:
    state = WizardState()
    apply(state, 1, {"alias": ["alias/Mine"], "description": ["d"], "origin": ["AWS_CLOUDHSM"]})
    apply(state, 3, {"tag_key": ["A", "A"], "tag_value": ["1", "2"]})
    loaded = WizardState.load(state.dump())
    assert loaded == state
    assert WizardState.load("{not json") == WizardState()
    assert check_step(loaded, 1, own_account="111122223333") == {}
    assert "tag_key.1" in check_step(loaded, 3, own_account="111122223333")
    apply(loaded, 5, {"account": ["111122223333", "12"]})
    errors = check_step(loaded, 5, own_account="111122223333")
    assert set(errors) == {"account.0", "account.1"}
    assert error_step("CustomKeyStoreInvalidStateException") == 2
    assert error_step("AccessDeniedException") == 6


def test_the_generated_policy_is_the_console_generators_and_edits_are_kept() -> None:
    state = WizardState(admins=["arn:aws:iam::111122223333:role/R"], admin_delete=False)
    assert refresh_policy(state, "aws", "111122223333") is False
    assert state.policy == console_key_policy(
        "aws",
        "111122223333",
        key_administrators=["arn:aws:iam::111122223333:role/R"],
        administrators_can_delete=False,
    )
    state.policy = state.policy.replace("key-consolepolicy-3", "mine")
    state.admins = []
    assert refresh_policy(state, "aws", "111122223333") is True  # kept, not regenerated
    assert '"mine"' in state.policy
