"""A live hsmbridge for security and operability tests: `create_app` over a KmsEnv, served by a
real uvicorn on loopback, with boto3 clients, the audit file, /metrics and /health at hand.

The production wiring is used unchanged (buffered audit file, timed connector, private metrics
registry); only the clocks are injected: the service's wall clock (deletion windows) and the
health cache's monotonic clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import urllib3
from botocore.config import Config

from hsmbridge.http.compose import Runtime, create_app
from hsmbridge.http.server import ThreadedServer
from hsmbridge.trail.rotation import read_lines
from hsmbridge.trail.sinks import BufferedJsonLinesSink
from tests.harness import ACCESS_KEY, REGION, SECRET_KEY, FakeClock, KmsEnv

HTTP = urllib3.PoolManager()


@dataclass
class Live:
    env: KmsEnv
    runtime: Runtime
    server: ThreadedServer
    health_clock: FakeClock
    kms: Any = None
    store_id: str = ""
    closed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.endpoint_url

    @property
    def audit_path(self) -> Path:
        return self.env.settings.audit_log

    def client(self, **kwargs: Any) -> Any:
        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=kwargs.pop("region", REGION),
            aws_access_key_id=kwargs.pop("access_key", ACCESS_KEY),
            aws_secret_access_key=kwargs.pop("secret_key", SECRET_KEY),
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )

    def get(self, path: str) -> tuple[int, bytes, str]:
        resp = HTTP.request("GET", self.url + path, retries=False, timeout=30)
        return resp.status, resp.data, resp.headers.get("content-type", "")

    def health(self) -> tuple[int, dict[str, Any]]:
        status, body, _ = self.get("/health")
        return status, json.loads(body)

    def events(self) -> list[dict[str, Any]]:
        """Every audit record written so far, rotated files first (the buffered sink is flushed
        first)."""
        sink = self.runtime.audit
        if isinstance(sink, BufferedJsonLinesSink) and not self.closed:
            sink.flush()
        return [json.loads(line) for line in read_lines(self.audit_path) if line]

    def create_store(self, password: str | None = None) -> str:
        resp = self.kms.create_custom_key_store(
            CustomKeyStoreName=f"LiveStore-{time.monotonic_ns()}",
            CloudHsmClusterId=self.env.cluster_id,
            TrustAnchorCertificate=self.env.pki.ca_cert_pem,
            KeyStorePassword=password or self.env.password,
        )
        self.store_id = resp["CustomKeyStoreId"]
        return self.store_id

    def connect(self, store_id: str | None = None, timeout: float = 20.0) -> None:
        store_id = store_id or self.store_id
        self.kms.connect_custom_key_store(CustomKeyStoreId=store_id)
        deadline = time.monotonic() + timeout
        while True:
            store = self.kms.describe_custom_key_stores(CustomKeyStoreId=store_id)
            state = store["CustomKeyStores"][0]["ConnectionState"]
            if state == "CONNECTED":
                return
            if state == "FAILED" or time.monotonic() > deadline:
                raise AssertionError(f"store {store_id} did not connect: {store}")
            time.sleep(0.05)

    def create_key(self, **kwargs: Any) -> dict[str, Any]:
        kwargs.setdefault("CustomKeyStoreId", self.store_id)
        kwargs.setdefault("Origin", "AWS_CLOUDHSM")
        metadata: dict[str, Any] = self.kms.create_key(**kwargs)["KeyMetadata"]
        return metadata

    def close(self) -> None:
        if not self.closed:
            self.server.stop()
            self.runtime.close()
            self.closed = True


@contextmanager
def served_with_store(
    env: KmsEnv, *, prepare: Callable[[Live], None] | None = None, **create_kwargs: Any
) -> Iterator[Live]:
    """`start_live`, then a custom key store created and connected through boto3 (after
    `prepare`, e.g. to choose whose client does it); closed after."""
    live = start_live(env, **create_kwargs)
    try:
        if prepare is not None:
            prepare(live)
        live.create_store()
        live.connect()
        yield live
    finally:
        live.close()


def start_live(env: KmsEnv, **create_kwargs: Any) -> Live:
    """Serve `env` (whose own service is closed first: one service per files at a time)."""
    env.close()
    health_clock = FakeClock(1_000.0)
    create_kwargs.setdefault("sweep_interval_s", None)
    create_kwargs.setdefault("health_clock", health_clock)
    runtime = create_app(env.settings, clock=env.clock, **create_kwargs)
    server = ThreadedServer(runtime.app).start()
    live = Live(env, runtime, server, health_clock)
    live.kms = live.client()
    return live


@pytest.fixture
def make_live(make_kms_env: Callable[..., KmsEnv]) -> Iterator[Callable[..., Live]]:
    """Factory: a live server; `store=True` creates and connects a store through boto3."""
    made: list[Live] = []

    def make(store: bool = True, **create_kwargs: Any) -> Live:
        live = start_live(make_kms_env(store=False), **create_kwargs)
        made.append(live)
        if store:
            live.create_store()
            live.connect()
        return live

    yield make
    for live in made:
        live.close()


@pytest.fixture
def live(make_live: Callable[..., Live]) -> Live:
    """A live server over a fresh SoftHSM-backed environment with a connected store."""
    return make_live()
