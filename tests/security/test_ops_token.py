"""`GET /health` and `GET /metrics` behind a bearer token (hardening finding F10), on the
production app over a real SoftHSM2 store: with `[service] ops_token_file` set, both answer 401
without the token or with a wrong one, and as before with it; a token file others can read, a
missing one or a short token stops start-up with a ConfigError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import urllib3

from hsmbridge.errors import ConfigError
from hsmbridge.http.compose import create_app
from tests.live import start_live

pytestmark = pytest.mark.softhsm

TOKEN = "f3b9c0d1e2a4b5c6d7e8f9a0b1c2d3e4"
HTTP = urllib3.PoolManager()


def _with_ops_token(config_path: Path, token: str | None, mode: int = 0o600) -> Path:
    text = config_path.read_text()
    config_path.write_text(
        text.replace("[service]\n", '[service]\nops_token_file = "ops.token"\n', 1)
    )
    path = config_path.parent / "ops.token"
    if token is not None:
        path.write_text(token + "\n")
        path.chmod(mode)
    return path


def _get(url: str, path: str, **headers: str) -> Any:
    return HTTP.request("GET", url + path, headers=headers, retries=False, timeout=10)


def test_operations_endpoints_need_the_bearer_token(make_kms_env: Any) -> None:
    env = make_kms_env(store=False)
    _with_ops_token(env.config_path, TOKEN)
    live = start_live(env)
    try:
        for path in ("/health", "/metrics"):
            missing = _get(live.url, path)
            assert missing.status == 401
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            assert b"hsmbridge_" not in missing.data
            assert b"stores" not in missing.data
            for wrong in (f"Bearer {TOKEN[:-1]}x", TOKEN, f"Basic {TOKEN}", "Bearer "):
                assert _get(live.url, path, Authorization=wrong).status == 401
            good = _get(live.url, path, Authorization=f"Bearer {TOKEN}")
            assert good.status == 200, (path, good.data)
        # KMS requests are SigV4's business, not the token's.
        assert live.kms.list_keys()["Keys"] == []
    finally:
        live.close()


def test_without_the_setting_they_stay_open(live: Any) -> None:
    # The health report itself, unauthenticated: 200, or 503 if a busy machine made the HSM
    # ping slow (DEGRADED); never the 401 the token would bring.
    health = _get(live.url, "/health")
    assert health.status in (200, 503), health.data
    assert live.store_id in json.loads(health.data)["stores"]
    assert _get(live.url, "/metrics").status == 200


@pytest.mark.parametrize(
    ("token", "mode", "message"),
    [
        (TOKEN, 0o644, "chmod 600"),
        (None, 0o600, "does not exist"),
        ("short", 0o600, "at least 16"),
    ],
)
def test_a_bad_token_file_stops_start_up(
    make_kms_env: Any, token: str | None, mode: int, message: str
) -> None:
    env = make_kms_env(store=False)
    path = _with_ops_token(env.config_path, token, mode)
    env.close()
    with pytest.raises(ConfigError) as refused:
        create_app(env.settings, sweep_interval_s=None)
    assert str(path) in str(refused.value)
    assert message in str(refused.value)
