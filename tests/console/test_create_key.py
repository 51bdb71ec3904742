"""The seed's "Create a CMK in a custom key store" procedure through the console's wizard, in
Chromium, then checked from outside: boto3 (DescribeKey, GetKeyPolicy, ListAliases, tags) and
OpenSC's pkcs11-tool on the token. Also its failure paths (a store that is not CONNECTED cannot
be chosen; CustomKeyStoreInvalidStateException and CloudHsmClusterInvalidConfigurationException
on step 2, a malformed key policy on step 6, each with the inputs kept), a principal without
kms:CreateKey (AccessDeniedException on the last step), and creation by keyboard alone.
"""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import Page, expect

from hsmbridge.policy.console import console_key_policy
from tests import pkcs11_tool
from tests.console.conftest import (
    ROLE_ARN,
    STORE_NAME,
    TESTER_ARN,
    VIEWER_ARN,
    ConsoleEnv,
    events,
    screenshot,
    sign_in,
    wizard_step,
)
from tests.harness import ACCOUNT

pytestmark = pytest.mark.slow
OTHER_ACCOUNT = "444455556666"


def _next(page: Page) -> None:
    page.get_by_role("button", name="Next", exact=True).click()


def _to_step_6(page: Page, console: ConsoleEnv, alias: str) -> None:
    """Steps 1-5 with the store chosen and nothing else added."""
    page.goto(console.url + "keys/create")
    page.get_by_label("Alias").fill(alias)
    _next(page)
    page.get_by_role("radio", name=STORE_NAME).check()
    for step in (2, 3, 4, 5):
        wizard_step(page, step)
        _next(page)
    wizard_step(page, 6)


def test_the_seed_procedure_end_to_end(page: Page, console_env: ConsoleEnv) -> None:
    sign_in(page, console_env)
    page.get_by_role("link", name="Create key").click()

    # 1. Alias and description; Advanced options -> Key material origin.
    wizard_step(page, 1)
    page.get_by_label("Alias").fill("ExampleKey")
    page.get_by_label("Description").fill("A key in the CloudHSM key store")
    page.get_by_text("Advanced options").click()
    page.get_by_role("radio", name="Custom key store (CloudHSM)").check()
    expect(page.get_by_role("radio", name="KMS", exact=True)).to_be_disabled()
    screenshot(page, "step-1-configure-key")
    _next(page)

    # 2. The store, with its cluster and the cluster's ACTIVE HSMs from the inventory.
    wizard_step(page, 2)
    store = page.get_by_role("radio", name=STORE_NAME)
    expect(store).to_be_enabled()
    facts = page.locator(f"#store-{console_env.store_id}-facts")
    expect(facts).to_contain_text(console_env.env.cluster_id)
    expect(facts).to_contain_text("ACTIVE HSMs: 2 in us-east-1a, us-east-1b")
    expect(page.get_by_role("link", name="Create custom key store")).to_be_visible()
    _next(page)  # nothing chosen: the step says so
    expect(page.get_by_text("Choose a custom key store.")).to_be_visible()
    page.get_by_role("button", name="Previous").click()
    expect(page.get_by_label("Alias")).to_have_value("ExampleKey")  # kept
    _next(page)
    store.check()
    screenshot(page, "step-2-custom-key-store")
    _next(page)

    # 3. Tags.
    wizard_step(page, 3)
    page.get_by_label("Tag key").fill("Project")
    page.get_by_label("Tag value").fill("Seed")
    page.get_by_role("button", name="Add tag").click()
    page.get_by_label("Tag key").nth(1).fill("Owner")
    page.get_by_label("Tag value").nth(1).fill("Security")
    screenshot(page, "step-3-tags")
    _next(page)

    # 4. Key administrators (the account's IAM users and roles), deletion allowed by default.
    wizard_step(page, 4)
    admins = page.get_by_role("group", name="Key administrators")
    expect(admins.get_by_role("checkbox")).to_have_count(3)  # tester, viewer, KeyAdminRole
    admins.get_by_role("checkbox", name=ROLE_ARN).check()
    delete = page.get_by_role("checkbox", name="Allow key administrators to delete this key")
    expect(delete).to_be_checked()
    screenshot(page, "step-4-key-administrators")
    _next(page)

    # 5. Key users of this account and another AWS account.
    wizard_step(page, 5)
    page.get_by_role("group", name="This account").get_by_role("checkbox", name=VIEWER_ARN).check()
    page.get_by_role("button", name="Add another AWS account").click()
    page.get_by_label("AWS account ID").fill(OTHER_ACCOUNT)
    screenshot(page, "step-5-key-users")
    _next(page)

    # 6. The console's key policy, statement for statement, editable.
    wizard_step(page, 6)
    expected = console_key_policy(
        "aws",
        ACCOUNT,
        key_administrators=[ROLE_ARN],
        key_users=[VIEWER_ARN],
        external_accounts=[OTHER_ACCOUNT],
    )
    policy_box = page.get_by_label("Key policy")
    expect(policy_box).to_have_value(expected)
    edited = json.loads(expected)
    edited["Id"] = "key-consolepolicy-edited"
    submitted = json.dumps(edited, indent=2)
    policy_box.fill(submitted)
    screenshot(page, "step-6-key-policy")
    page.get_by_role("button", name="Finish").click()

    # Success shows the new key.
    expect(page.get_by_role("status")).to_contain_text("Your key was created")
    crypto = page.get_by_role("region", name="Cryptographic configuration")
    expect(crypto).to_contain_text("CloudHSM")
    expect(crypto).to_contain_text(STORE_NAME)
    expect(crypto).to_contain_text(console_env.store_id)
    expect(crypto).to_contain_text(console_env.env.cluster_id)
    key_id = page.url.rsplit("/", 1)[-1].partition("?")[0]
    screenshot(page, "step-7-key-created")

    # Checked from outside the console: boto3 ...
    kms = console_env.live.kms
    meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    assert meta["Origin"] == "AWS_CLOUDHSM"
    assert meta["CustomKeyStoreId"] == console_env.store_id
    assert meta["CloudHsmClusterId"] == console_env.env.cluster_id
    assert meta["Description"] == "A key in the CloudHSM key store"
    assert json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]) == edited
    aliases = kms.list_aliases(KeyId=key_id)["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/ExampleKey"]
    tags = kms.list_resource_tags(KeyId=key_id)["Tags"]
    assert {t["TagKey"]: t["TagValue"] for t in tags} == {"Project": "Seed", "Owner": "Security"}
    # ... and pkcs11-tool: the token holds one AES key labelled with the key's ARN.
    on_token = pkcs11_tool.secret_keys(console_env.token_label, console_env.pin)
    assert meta["Arn"] in on_token
    assert bytes.fromhex(str(on_token[meta["Arn"]]["id"])).decode() == key_id

    # One audit line per operation, as the signed-in principal, like the API's.
    created = [e for e in events(console_env, "CreateKey") if e["keyArn"] == meta["Arn"]]
    assert len(created) == 1
    assert created[0]["principalArn"] == TESTER_ARN
    assert created[0]["customKeyStoreId"] == console_env.store_id
    assert created[0]["additionalEventData"]["sessionCredentialFromConsole"] == "true"
    assert created[0]["requestParameters"]["Origin"] == "AWS_CLOUDHSM"

    # The list shows it; Preferences add the Custom key store ID column, remembered.
    pane = page.get_by_role("navigation", name="Navigation pane")
    pane.get_by_role("link", name="Customer managed keys").click()
    row = page.get_by_role("row").filter(has_text=key_id)
    expect(row).to_contain_text("ExampleKey")
    expect(row).to_contain_text("CloudHSM")
    expect(row).not_to_contain_text(console_env.store_id)
    page.get_by_text("Preferences").click()
    page.get_by_role("checkbox", name="Custom key store ID").check()
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("columnheader", name="Custom key store ID")).to_be_visible()
    page.reload()
    expect(page.get_by_role("row").filter(has_text=key_id)).to_contain_text(console_env.store_id)
    screenshot(page, "customer-managed-keys")


def test_failures_show_on_their_step_with_the_inputs_kept(
    page: Page, console_env: ConsoleEnv
) -> None:
    live, env = console_env.live, console_env.env
    sign_in(page, console_env)

    # Step 1's own rules, and an alias that exists already.
    page.goto(console_env.url + "keys/create")
    page.get_by_label("Alias").fill("aws/mine")
    _next(page)
    wizard_step(page, 1)
    expect(page.get_by_text("reserved for AWS managed keys")).to_be_visible()
    taken = live.create_key()["KeyId"]
    live.kms.create_alias(AliasName="alias/Taken", TargetKeyId=taken)
    page.get_by_label("Alias").fill("Taken")
    _next(page)
    expect(page.get_by_text("An alias named alias/Taken already exists")).to_be_visible()

    # A malformed policy: refused on step 6 by the console (not JSON) and by KMS (not a policy).
    _to_step_6(page, console_env, "FailingKey")
    page.get_by_label("Key policy").fill('{"Statement": [')
    page.get_by_role("button", name="Finish").click()
    wizard_step(page, 6)
    expect(page.get_by_text("The key policy is not valid JSON")).to_be_visible()
    expect(page.get_by_label("Key policy")).to_have_value('{"Statement": [')
    page.get_by_label("Key policy").fill('{"Version": "2012-10-17", "Statement": "nothing"}')
    page.get_by_role("button", name="Finish").click()
    wizard_step(page, 6)
    expect(page.get_by_role("alert").first).to_contain_text("MalformedPolicyDocumentException")

    # The store is disconnected before Finish: KMS's error, on step 2, inputs kept.
    _to_step_6(page, console_env, "FailingKey")
    live.kms.disconnect_custom_key_store(CustomKeyStoreId=console_env.store_id)
    try:
        page.get_by_role("button", name="Finish").click()
        wizard_step(page, 2)
        expect(page.get_by_role("alert").first).to_contain_text(
            "CustomKeyStoreInvalidStateException"
        )
        store = page.get_by_role("radio", name=STORE_NAME)
        expect(store).to_be_disabled()  # a store that is not CONNECTED cannot be chosen
        expect(page.locator(f"#store-{console_env.store_id}-facts")).to_contain_text(
            "The key store is DISCONNECTED; connect it to create keys in it."
        )
        page.get_by_role("button", name="Previous").click()
        expect(page.get_by_label("Alias")).to_have_value("FailingKey")
        # A crafted post choosing it anyway is refused by the step's rule.
        _next(page)
        wizard_step(page, 2)
        _next(page)
        expect(page.get_by_text("Choose a custom key store.")).to_be_visible()
    finally:
        live.connect(console_env.store_id)

    # The cluster loses an AZ before Finish: CloudHsmClusterInvalidConfigurationException, step 2.
    _to_step_6(page, console_env, "FailingKey")
    env.write_inventory(azs=("us-east-1a",))
    try:
        page.get_by_role("button", name="Finish").click()
        wizard_step(page, 2)
        expect(page.get_by_role("alert").first).to_contain_text(
            "CloudHsmClusterInvalidConfigurationException"
        )
        expect(page.locator(f"#store-{console_env.store_id}-facts")).to_contain_text(
            "ACTIVE HSMs: 1 in us-east-1a"
        )
    finally:
        env.write_inventory()
    names = [a["AliasName"] for a in live.kms.list_aliases()["Aliases"]]
    assert "alias/FailingKey" not in names  # nothing was created by the failures


def test_a_principal_without_create_key_sees_access_denied_on_the_last_step(
    page: Page, console_env: ConsoleEnv
) -> None:
    viewer = console_env.viewer
    keys_before = len(console_env.live.kms.list_keys(Limit=1000)["Keys"])
    sign_in(page, console_env, viewer.access_key_id, viewer.secret)
    expect(page.get_by_role("banner")).to_contain_text(VIEWER_ARN)
    _to_step_6(page, console_env, "ViewerKey")
    page.get_by_role("button", name="Finish").click()
    wizard_step(page, 6)
    alert = page.get_by_role("alert").first
    expect(alert).to_contain_text("AccessDeniedException")
    expect(alert).to_contain_text(VIEWER_ARN)
    expect(page.get_by_label("Key policy")).not_to_be_empty()
    assert len(console_env.live.kms.list_keys(Limit=1000)["Keys"]) == keys_before
    denied = events(console_env, "CreateKey")[-1]
    assert denied["principalArn"] == VIEWER_ARN
    assert denied["errorCode"] == "AccessDeniedException"


def _tab_to(page: Page, name: str, limit: int = 80) -> None:
    """Press Tab until the focused element's text or label is `name`."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "() => { const e = document.activeElement;"
            " const l = e.labels && e.labels.length ? e.labels[0].textContent : '';"
            " return (l || e.textContent || e.value || '').trim(); }"
        )
        if focused == name:
            return
    raise AssertionError(f"{name!r} was not reached with Tab")


def test_keyboard_only_creation(page: Page, console_env: ConsoleEnv) -> None:
    page.goto(console_env.url + "signin")
    # Chromium applies `autofocus` after the load event: type only once it has.
    expect(page.get_by_label("Access key ID")).to_be_focused()
    page.keyboard.type("AKIAHSMBRIDGETEST001")
    page.keyboard.press("Tab")
    page.keyboard.type("test-secret-key-for-hsmbridge-tests-0001")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Customer managed keys")).to_be_visible()
    _tab_to(page, "Create key")
    page.keyboard.press("Enter")
    wizard_step(page, 1)
    expect(page.locator("#alias")).to_be_focused()
    page.keyboard.type("KeyboardKey")
    _tab_to(page, "Advanced options")
    page.keyboard.press("Enter")
    _tab_to(page, "Custom key store (CloudHSM)")
    page.keyboard.press("Space")
    _tab_to(page, "Next")
    page.keyboard.press("Enter")
    wizard_step(page, 2)
    _tab_to(page, STORE_NAME)
    page.keyboard.press("Space")
    _tab_to(page, "Next")
    page.keyboard.press("Enter")
    wizard_step(page, 3)
    _tab_to(page, "Next")
    page.keyboard.press("Enter")
    wizard_step(page, 4)
    _tab_to(page, TESTER_ARN)
    page.keyboard.press("Space")
    _tab_to(page, "Next")
    page.keyboard.press("Enter")
    wizard_step(page, 5)
    _tab_to(page, "Next")
    page.keyboard.press("Enter")
    wizard_step(page, 6)
    _tab_to(page, "Finish")
    page.keyboard.press("Enter")
    expect(page.get_by_role("status")).to_contain_text("Your key was created")
    key_id = page.url.rsplit("/", 1)[-1].partition("?")[0]
    kms = console_env.live.kms
    policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    admins = [s for s in policy["Statement"] if s["Sid"] == "Allow access for Key Administrators"]
    assert admins[0]["Principal"] == {"AWS": TESTER_ARN}
    aliases = kms.list_aliases(KeyId=key_id)["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/KeyboardKey"]
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Origin"] == "AWS_CLOUDHSM"
