"""Sign-in, sessions and CSRF: the console authenticates the caller itself.

A wrong secret is refused without saying which half was wrong; the session cookie is HttpOnly,
SameSite=Strict, scoped to /console/ and expiring; signing out ends the session (the old cookie
is refused); a POST without or with a wrong CSRF token is refused with 403 and changes nothing;
after five wrong secrets for one access key ID its sign-ins are refused (429) for a while.
"""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from tests.console.conftest import TESTER_ARN, ConsoleEnv, events, sign_in
from tests.harness import ACCESS_KEY, ACCOUNT, REGION

pytestmark = pytest.mark.slow

FAILED = "The access key ID or the secret access key is not correct."


def test_sign_in_shows_who_and_where_then_sign_out_ends_the_session(
    page: Page, console_env: ConsoleEnv
) -> None:
    page.goto(console_env.url + "keys")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()  # not signed in yet

    page.get_by_label("Access key ID").fill(ACCESS_KEY)
    page.get_by_label("Secret access key").fill("not-the-secret")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(FAILED)
    expect(page.get_by_label("Access key ID")).to_have_value(ACCESS_KEY)
    page.get_by_label("Access key ID").fill("AKIANOSUCHKEY0000000")
    page.get_by_label("Secret access key").fill("whatever")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(FAILED)  # same words: nothing told apart

    sign_in(page, console_env)
    header = page.get_by_role("banner")
    expect(header).to_contain_text(ACCOUNT)
    expect(header).to_contain_text(TESTER_ARN)
    expect(header).to_contain_text(REGION)
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["hsmbridge-console-session"]
    assert session["httpOnly"] is True
    assert session["sameSite"] == "Strict"
    assert session["path"] == "/console/"
    assert 11 * 3600 < session["expires"] - time.time() <= 12 * 3600 + 5
    assert "hsmbridge-console-signin" not in cookies  # the pre-session cookie is gone

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.context.add_cookies([session])  # the old cookie, replayed, no longer works
    page.goto(console_env.url + "keys")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    logins = events(console_env, "ConsoleLogin")
    assert [e["errorCode"] for e in logins[-3:]] == [
        "Failed authentication",
        "Failed authentication",
        None,
    ]
    assert logins[-1]["principalArn"] == TESTER_ARN
    assert logins[-1]["eventSource"] == "signin.amazonaws.com"
    assert all(e["principalArn"] is None for e in logins[-3:-1])


def test_a_post_without_the_right_csrf_token_is_refused_and_changes_nothing(
    page: Page, console_env: ConsoleEnv
) -> None:
    kms = console_env.live.kms
    key_id = console_env.live.create_key()["KeyId"]
    keys_before = len(kms.list_keys(Limit=1000)["Keys"])
    sign_in(page, console_env)
    page.goto(console_env.url + f"keys/{key_id}")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    assert token

    for form in ({}, {"csrf": "wrong-token"}, {"csrf": token[:-2] + "xx"}):
        answer = page.request.post(console_env.url + f"keys/{key_id}/disable", form=form)
        assert answer.status == 403
        assert "CSRF" in answer.text()
        answer = page.request.post(
            console_env.url + "keys/create",
            form={**form, "step": "6", "action": "finish", "wizard": "{}"},
        )
        assert answer.status == 403
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    assert len(kms.list_keys(Limit=1000)["Keys"]) == keys_before

    # The same request with the session's token goes through: the token was the only difference.
    answer = page.request.post(console_env.url + f"keys/{key_id}/disable", form={"csrf": token})
    assert answer.status == 200  # after the redirect to the key's page
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    disabled = events(console_env, "DisableKey")[-1]
    assert disabled["principalArn"] == TESTER_ARN
    assert disabled["additionalEventData"]["sessionCredentialFromConsole"] == "true"

    # Sign-in itself needs its form's token: a forged sign-in post is refused too.
    answer = page.request.post(
        console_env.url + "signin",
        form={"access_key_id": ACCESS_KEY, "secret_access_key": "x", "csrf": "forged"},
    )
    assert answer.status == 403


def test_guessing_a_secret_is_refused_after_five_failures(
    page: Page, console_env: ConsoleEnv
) -> None:
    # A key ID of its own: the tester's and the viewer's stay usable for the other tests.
    guessed = "AKIAGUESSED000000001"
    page.goto(console_env.url + "signin")
    for attempt in range(5):
        page.get_by_label("Access key ID").fill(guessed)
        page.get_by_label("Secret access key").fill(f"guess-{attempt}")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_have_text(FAILED)
    page.get_by_label("Secret access key").fill("guess-5")
    with page.expect_response(lambda r: r.url.endswith("/console/signin")) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 429
    assert 0 < int(answer.value.headers["retry-after"]) <= 60
    expect(page.get_by_role("alert")).to_contain_text("Too many failed sign-ins")
    refused = events(console_env, "ConsoleLogin")[-1]
    assert refused["errorCode"] == "Too many failed sign-ins"
    # Another key from the same address still signs in (the address allows more failures).
    sign_in(page, console_env)
    expect(page.get_by_role("banner")).to_contain_text(TESTER_ARN)
