"""Fixtures for keystore tests: a demo PKI, inventory files, and an in-process moto server."""

from __future__ import annotations

import json

import pytest

from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)

REGION = "us-east-1"


@pytest.fixture(scope="session")
def demo_cluster_id():
    return new_cluster_id()


@pytest.fixture(scope="session")
def demo_pki(demo_cluster_id):
    return make_demo_pki(demo_cluster_id)


@pytest.fixture
def inventory_file(tmp_path):
    """A writer: `inventory_file(document_or_text)` writes the file and returns its path."""
    path = tmp_path / "clusters.json"

    def write(doc):
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
        return path

    return write


@pytest.fixture
def demo_document(demo_cluster_id, demo_pki):
    return describe_clusters_document(
        [DemoClusterSpec(demo_cluster_id, demo_pki.cluster_cert_pem, region=REGION)]
    )


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real moto HTTP server on 127.0.0.1 (the cloudhsmv2 wire protocol, not an in-process
    patch), shared by one test module."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself and we read it back, so no other process can
    # take the port between choosing and binding it.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_port  # moto exposes no public accessor for the bound port
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials, and no developer ~/.aws config leaking into the test."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
