"""The key list's pages, the key detail page's actions and the custom key stores page, in Chromium.

Key list: with two keys a page, Next page walks through every key once, First page returns, a
forged marker shows InvalidMarkerException.
Key detail: enable/disable, schedule deletion (the waiting period) and cancel it, edit the key
policy (a refusal keeps the draft). Custom key stores: a FAILED store shows its
ConnectionErrorCode with the troubleshooting text; Disconnect and Connect run the API's
operations; Edit renames a disconnected store and changes its kmsuser password (a new password
for a connected one is refused, a form with no change says so); a refused CreateCustomKeyStore or
UpdateCustomKeyStore shows KMS's error with the inputs kept.
"""

from __future__ import annotations

import json
import time

import pytest
from playwright.sync_api import Page, expect

from hsmbridge.console import pages as console_pages
from tests.cloudhsm_shim import runbook_password
from tests.conftest import SO_PIN
from tests.console.conftest import STORE_NAME, TESTER_ARN, ConsoleEnv, events, sign_in

pytestmark = pytest.mark.slow


def test_key_detail_actions(page: Page, console_env: ConsoleEnv) -> None:
    kms = console_env.live.kms
    key_id = console_env.live.create_key(Description="detail page")["KeyId"]
    kms.tag_resource(KeyId=key_id, Tags=[{"TagKey": "Team", "TagValue": "Crypto"}])
    sign_in(page, console_env)
    page.goto(console_env.url + f"keys/{key_id}")
    general = page.get_by_role("region", name="General configuration")
    expect(general).to_contain_text("Enabled")
    expect(page.get_by_role("region", name="Cryptographic configuration")).to_contain_text(
        STORE_NAME
    )
    expect(page.get_by_role("region", name="Tags")).to_contain_text("Crypto")

    page.get_by_role("button", name="Disable").click()
    expect(general).to_contain_text("Disabled")
    page.get_by_role("button", name="Enable").click()
    expect(general).to_contain_text("Enabled")

    window = page.get_by_label("Waiting period (in days)")
    window.fill("3")  # the browser refuses it (min 7); the server too, if sent anyway:
    assert window.evaluate("e => e.validity.rangeUnderflow")
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(
        console_env.url + f"keys/{key_id}/schedule-deletion", form={"csrf": token, "window": "3"}
    )
    assert answer.status == 400
    assert "The waiting period must be 7 to 30 days." in answer.text()
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    page.get_by_label("Waiting period (in days)").fill("7")
    page.get_by_role("button", name="Schedule key deletion").click()
    expect(general).to_contain_text("PendingDeletion")
    assert events(console_env, "ScheduleKeyDeletion")[-1]["requestParameters"] == {
        "KeyId": key_id,
        "PendingWindowInDays": 7,
    }
    page.get_by_role("button", name="Cancel key deletion").click()
    expect(general).to_contain_text("Disabled")  # KMS leaves a cancelled key disabled

    policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    policy["Statement"].append(
        {
            "Sid": "Deny nobody",
            "Effect": "Deny",
            "Principal": {"AWS": "arn:aws:iam::111122223333:user/nobody-here"},
            "Action": "kms:Decrypt",
            "Resource": "*",
        }
    )
    draft = json.dumps(policy, indent=2)
    page.get_by_role("textbox", name="Key policy").fill(draft)
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("alert")).to_contain_text("MalformedPolicyDocumentException")
    expect(page.get_by_role("textbox", name="Key policy")).to_have_value(draft)  # the draft is kept
    policy["Statement"][-1]["Principal"] = {"AWS": TESTER_ARN}
    policy["Statement"][-1]["Action"] = "kms:GenerateRandom"
    page.get_by_role("textbox", name="Key policy").fill(json.dumps(policy, indent=2))
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("alert")).to_have_count(0)
    saved = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    assert saved == policy


def _wait_state(console_env: ConsoleEnv, state: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stores = console_env.live.kms.describe_custom_key_stores(
            CustomKeyStoreId=console_env.store_id
        )["CustomKeyStores"]
        if stores[0]["ConnectionState"] == state:
            return
        assert time.monotonic() < deadline, f"store never became {state}: {stores}"
        time.sleep(0.05)


def test_custom_key_stores_page(page: Page, console_env: ConsoleEnv) -> None:
    kms, store_id = console_env.live.kms, console_env.store_id
    sign_in(page, console_env)
    page.get_by_role("navigation", name="Navigation pane").get_by_role(
        "link", name="Custom key stores"
    ).click()
    row = page.get_by_role("row").filter(has_text=store_id)
    expect(row).to_contain_text("CONNECTED")
    expect(row).to_contain_text(console_env.env.cluster_id)
    expect(row).to_contain_text("2 (us-east-1a, us-east-1b)")

    # A new kmsuser password for a connected store: KMS's refusal on the form, inputs kept.
    row.get_by_role("link", name=f"Edit {STORE_NAME}").click()
    page.get_by_label("Custom key store name").fill("RenamedStore")
    page.get_by_label("New kmsuser password").fill("another-password-1")
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_role("alert")).to_contain_text("CustomKeyStoreInvalidStateException")
    expect(page.get_by_label("Custom key store name")).to_have_value("RenamedStore")
    expect(page.get_by_label("New kmsuser password")).to_have_value("")  # never sent back

    # Disconnected, it is renamed and given a wrong kmsuser password through the console: the
    # store then FAILs with INVALID_CREDENTIALS and the page says why.
    renamed = "RenamedStore"
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    try:
        page.get_by_role("navigation", name="Navigation pane").get_by_role(
            "link", name="Custom key stores"
        ).click()
        row.get_by_role("link", name=f"Edit {STORE_NAME}").click()
        page.get_by_role("button", name="Save changes").click()  # nothing changed
        expect(page.get_by_role("alert")).to_contain_text("Nothing to change")
        page.get_by_label("Custom key store name").fill(renamed)
        page.get_by_label("New kmsuser password").fill("wrong-password-1")
        page.get_by_role("button", name="Save changes").click()
        expect(page.get_by_role("status")).to_contain_text("The key store was updated")
        expect(row).to_contain_text(renamed)
        update = events(console_env, "UpdateCustomKeyStore")[-1]
        assert update["principalArn"] == TESTER_ARN
        assert "wrong-password-1" not in json.dumps(update)
        kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        _wait_state(console_env, "FAILED")
        page.reload()
        expect(row).to_contain_text("INVALID_CREDENTIALS")
        expect(row).to_contain_text("The kmsuser password of the key store was refused")
        row.get_by_role("button", name=f"Disconnect {renamed}").click()
        expect(page.get_by_role("status")).to_contain_text("disconnected")
        expect(row).to_contain_text("DISCONNECTED")
        row.get_by_role("link", name=f"Edit {renamed}").click()
        page.get_by_label("Custom key store name").fill(STORE_NAME)
        known = runbook_password(console_env.env.token_label, SO_PIN, console_env.env.password)
        page.get_by_label("New kmsuser password").fill(known)
        page.get_by_role("button", name="Save changes").click()
        expect(page.get_by_role("status")).to_contain_text("The key store was updated")
        row.get_by_role("button", name=f"Connect {STORE_NAME}").click()
        expect(page.get_by_role("status")).to_contain_text("Connecting")
        _wait_state(console_env, "CONNECTED")
    finally:
        # CONNECTED again, under its name, for the other tests.
        state = kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"]
        if state[0]["ConnectionState"] != "DISCONNECTED":
            kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
            _wait_state(console_env, "DISCONNECTED")
        known = runbook_password(console_env.env.token_label, SO_PIN, console_env.env.password)
        kms.update_custom_key_store(
            CustomKeyStoreId=store_id, NewCustomKeyStoreName=STORE_NAME, KeyStorePassword=known
        )
        console_env.live.connect(store_id)
    assert events(console_env, "ConnectCustomKeyStore")[-1]["principalArn"] == TESTER_ARN

    # Creating a store on a cluster that already has one: KMS's error, inputs kept.
    page.get_by_role("link", name="Create custom key store").click()
    page.get_by_label("Custom key store name").fill("SecondStore")
    page.get_by_label("CloudHSM cluster ID").fill(console_env.env.cluster_id)
    page.get_by_label("Trust anchor certificate").fill(console_env.env.pki.ca_cert_pem)
    page.get_by_label("kmsuser password").fill(console_env.env.password)
    page.get_by_role("button", name="Create custom key store").click()
    expect(page.get_by_role("alert")).to_contain_text("CloudHsmClusterInUseException")
    expect(page.get_by_label("Custom key store name")).to_have_value("SecondStore")
    expect(page.get_by_label("kmsuser password")).to_have_value("")  # never sent back
    _second_store_created_and_deleted(page, console_env)


def _second_store_created_and_deleted(page: Page, console_env: ConsoleEnv) -> None:
    """On the form KMS refused: the cluster with no store yet, then the store deleted again."""
    spare, pki = console_env.spare_cluster, console_env.spare_pki
    page.get_by_label("CloudHSM cluster ID").fill(spare.cluster_id)
    page.get_by_label("Trust anchor certificate").fill(pki.ca_cert_pem)
    page.get_by_label("kmsuser password").fill(console_env.env.password)
    page.get_by_role("button", name="Create custom key store").click()
    expect(page.get_by_role("status")).to_contain_text("The key store was created")
    row = page.get_by_role("row").filter(has_text="SecondStore")
    expect(row).to_contain_text(spare.cluster_id)
    expect(row).to_contain_text("DISCONNECTED")
    expect(row).to_contain_text("2 (us-east-1a, us-east-1b)")
    created = events(console_env, "CreateCustomKeyStore")[-1]
    assert created["principalArn"] == TESTER_ARN
    assert created.get("errorCode") is None
    assert console_env.env.password not in json.dumps(created)
    kms = console_env.live.kms
    stores = kms.describe_custom_key_stores(CustomKeyStoreName="SecondStore")["CustomKeyStores"]
    assert [s["CloudHsmClusterId"] for s in stores] == [spare.cluster_id]
    second_id = stores[0]["CustomKeyStoreId"]

    # Deleting goes through a confirmation; KMS's refusal for a connected store shows there.
    page.goto(f"{console_env.url}keystores/{console_env.store_id}/delete")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Delete {STORE_NAME}")
    page.get_by_role("button", name="Delete custom key store").click()
    expect(page.get_by_role("alert")).to_contain_text("CustomKeyStoreInvalidStateException")
    assert kms.describe_custom_key_stores(CustomKeyStoreId=console_env.store_id)
    page.get_by_role("link", name="Cancel").click()
    row.get_by_role("link", name="Delete SecondStore").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Delete SecondStore")
    page.get_by_role("button", name="Delete custom key store").click()
    expect(page.get_by_role("status")).to_contain_text("The key store was deleted")
    expect(page.get_by_role("row").filter(has_text="SecondStore")).to_have_count(0)
    names = [s["CustomKeyStoreName"] for s in kms.describe_custom_key_stores()["CustomKeyStores"]]
    assert names == [STORE_NAME]
    deleted = events(console_env, "DeleteCustomKeyStore")
    assert [e.get("errorCode") for e in deleted] == ["CustomKeyStoreInvalidStateException", None]
    assert deleted[-1]["requestParameters"] == {"CustomKeyStoreId": second_id}


def test_the_key_list_pages_through_every_key(
    page: Page, console_env: ConsoleEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_pages, "KEYS_PER_PAGE", 2)  # the server runs in this process
    for _ in range(3):
        console_env.live.create_key(Description="paged")
    everything = {k["KeyId"] for k in console_env.live.kms.list_keys(Limit=1000)["Keys"]}
    assert len(everything) >= 3
    sign_in(page, console_env)
    page.goto(console_env.url + "keys")
    seen: list[str] = []
    for _ in range(len(everything)):
        table = page.get_by_role("table")
        expect(table.locator("caption")).to_contain_text("on this page")
        seen += table.locator("tbody tr td a").all_inner_texts()
        following = page.get_by_role("link", name="Next page")
        if following.count() == 0:
            break
        following.click()
    assert sorted(seen) == sorted(everything)  # every key once, across the pages
    page.get_by_role("link", name="First page").click()
    expect(page.get_by_role("link", name="First page")).to_have_count(0)
    page.goto(console_env.url + "keys?marker=not-a-marker")
    expect(page.get_by_role("alert")).to_contain_text("InvalidMarkerException")
