"""The web console under a real browser: Debian's Chromium driven by Playwright, against a live
hsmbridge (`create_app` served by uvicorn on loopback, as `hsmbridge serve` does) over a real
SoftHSM2 token with a CONNECTED custom key store named ExampleKeyStore, and a second cluster in
the inventory with no key store yet.

One server and one browser serve a whole module (each test gets a fresh browser context, so
fresh cookies). The credentials file holds the administrator `tester` (IAM allows everything) and
`viewer`, whose IAM policy allows only kms:List*, kms:Describe* and kms:Get* (no CreateKey); the
account's IAM file also lists the role KeyAdminRole. Chromium is launched by its executable path
(`apt-get install chromium`, done by softhsm/bootstrap.sh with `test`): Playwright never downloads
a browser. With HSMBRIDGE_CONSOLE_SCREENSHOTS=DIR the end-to-end test saves each wizard step there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from hsmbridge.config import ClusterBinding
from hsmbridge.keystore.demo import DemoClusterSpec, DemoPki, make_demo_pki, new_cluster_id
from tests.conftest import SoftHsmEnv
from tests.harness import ACCESS_KEY, ACCOUNT, REGION, SECRET_KEY, KmsEnv, build_env
from tests.iam_files import ALLOW_ALL, Iam, Keys, document, new_keys, statement, write_credentials
from tests.live import Live, start_live

CHROMIUM = os.environ.get("HSMBRIDGE_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}  # a laptop screen
TESTER_ARN = f"arn:aws:iam::{ACCOUNT}:user/tester"
VIEWER_ARN = f"arn:aws:iam::{ACCOUNT}:user/viewer"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/KeyAdminRole"
STORE_NAME = "ExampleKeyStore"


@dataclass
class ConsoleEnv:
    live: Live
    env: KmsEnv
    store_id: str
    viewer: Keys
    token_label: str
    pin: str
    spare_cluster: DemoClusterSpec  # in the inventory, with no key store: for creating one
    spare_pki: DemoPki

    @property
    def url(self) -> str:
        return self.live.url + "/console/"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def console_env(
    softhsm_env: SoftHsmEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConsoleEnv]:
    if not softhsm_env.stock:
        pytest.fail("SoftHSM token stock exhausted: raise HSMBRIDGE_TEST_TOKENS")
    label, pin = softhsm_env.stock.pop(0)
    softhsm_env.used[label] = pin
    binding = ClusterBinding("", replace(softhsm_env.profile, token_label=label))
    env = build_env(tmp_path_factory.mktemp("console"), binding, pin)
    spare_id = new_cluster_id()
    spare_pki = make_demo_pki(spare_id)
    spare = DemoClusterSpec(spare_id, spare_pki.cluster_cert_pem, region=REGION)
    env.add_clusters(spare)
    iam = Iam(ACCOUNT)
    iam.user("tester", ALLOW_ALL)
    iam.user("viewer", document(statement("Allow", ["kms:List*", "kms:Describe*", "kms:Get*"])))
    trust = document(
        statement("Allow", "sts:AssumeRole", Principal={"AWS": f"arn:aws:iam::{ACCOUNT}:root"})
    )
    del trust["Statement"][0]["Resource"]
    iam.role("KeyAdminRole", trust)
    iam.write(env.root / "iam")
    viewer = new_keys("viewer", VIEWER_ARN)
    write_credentials(
        env.root / "credentials", Keys("default", ACCESS_KEY, SECRET_KEY, TESTER_ARN), viewer
    )
    live = start_live(env)
    try:
        store_id = live.kms.create_custom_key_store(
            CustomKeyStoreName=STORE_NAME,
            CloudHsmClusterId=env.cluster_id,
            TrustAnchorCertificate=env.pki.ca_cert_pem,
            KeyStorePassword=env.password,
        )["CustomKeyStoreId"]
        live.store_id = store_id
        live.connect()
        yield ConsoleEnv(live, env, store_id, viewer, label, pin, spare, spare_pki)
    finally:
        live.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    # A busy CI machine renders a page in seconds, not milliseconds: Playwright's actions and
    # its `expect` (5 s by default) wait up to 15 s for what the test expects to appear.
    context.set_default_timeout(15_000)
    expect.set_options(timeout=15_000)
    tab = context.new_page()
    yield tab
    context.close()


def sign_in(
    page: Page, console: ConsoleEnv, access_key: str = ACCESS_KEY, secret: str = SECRET_KEY
):
    page.goto(console.url + "signin")
    page.get_by_label("Access key ID").fill(access_key)
    page.get_by_label("Secret access key").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Customer managed keys")).to_be_visible()


def screenshot(page: Page, name: str) -> None:
    """Into HSMBRIDGE_CONSOLE_SCREENSHOTS (for docs/console/), when it is set."""
    target = os.environ.get("HSMBRIDGE_CONSOLE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"{name}.png"), full_page=True)


def wizard_step(page: Page, number: int) -> None:
    expect(page).to_have_title(re.compile(rf"Create key: step {number} of 6"))


def events(console: ConsoleEnv, name: str) -> list[dict[str, Any]]:
    return [e for e in console.live.events() if e["eventName"] == name]
