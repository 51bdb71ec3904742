"""`hsmbridge serve` over HTTPS, and its refusal to serve plain HTTP beyond loopback, run as an
operator runs it.

* `[service] tls_cert`/`tls_key` (relative to hsmbridge.toml) or `--tls-cert`/`--tls-key`: the
  server speaks HTTPS only; boto3 verifying against the certificate works, plain HTTP does not,
  the banner names the https:// endpoint, and requests count as `aws:SecureTransport`.
* Only one of the pair: a configuration error naming the missing setting (exit 2).
* A non-loopback `listen_host` without TLS: exit 2, telling the operator about `--insecure-http`;
  with `--insecure-http` the server starts.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import REPO
from tests.operability.processes import BANNER
from tests.reliability.servers import InitEnv, ServerProcess, init_env

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

INSECURE_MESSAGE = "--insecure-http to serve plain HTTP anyway"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, PEM files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def _set_service(env: InitEnv, lines: str) -> None:
    text = env.config.read_text()
    assert "\n[service]\n" in text
    env.config.write_text(text.replace("\n[service]\n", f"\n[service]\n{lines}", 1))


def _serve(env: InitEnv, log: Path, *args: str) -> ServerProcess:
    argv = [sys.executable, "-m", "hsmbridge", "serve", "--config", str(env.config), "--workers"]
    return ServerProcess([*argv, *args], log).wait_ready()


def _run_serve(env: InitEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmbridge", "serve", "--config", str(env.config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _kms(env: InitEnv, url: str, verify: Path) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=env.access_key,
        aws_secret_access_key=env.secret_key,
        verify=str(verify),
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=30),
    )


def _banner(log: Path) -> str:
    [line] = [x for x in log.read_text().splitlines() if x.startswith(BANNER)]
    return line


def _plain_http_fails(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return  # the TLS server drops a connection that does not start a handshake
    finally:
        conn.close()
    raise AssertionError(f"plain HTTP to the HTTPS server was answered ({status})")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tls_from_the_configuration(tmp_path: Path, workers: str) -> None:
    env = init_env(tmp_path / "env")
    _self_signed(env.root / "tls")
    _set_service(env, 'tls_cert = "tls/cert.pem"\ntls_key = "tls/key.pem"\n')
    log = tmp_path / "server.log"
    srv = _serve(env, log, workers)
    try:
        url = f"https://127.0.0.1:{srv.port}"
        kms = _kms(env, url, env.root / "tls" / "cert.pem")
        stores = kms.describe_custom_key_stores()["CustomKeyStores"]
        assert [s["CustomKeyStoreId"] for s in stores] == [env.store_id]
        # aws:SecureTransport is true over TLS: a key policy denying Encrypt when it is true bites.
        key_id = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=env.store_id)[
            "KeyMetadata"
        ]["KeyId"]
        assert kms.encrypt(KeyId=key_id, Plaintext=b"over tls")["CiphertextBlob"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "No Encrypt over TLS",
                    "Effect": "Deny",
                    "Principal": {"AWS": "*"},
                    "Action": "kms:Encrypt",
                    "Resource": "*",
                    "Condition": {"Bool": {"aws:SecureTransport": "true"}},
                },
            ],
        }
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
        with pytest.raises(ClientError) as denied:
            kms.encrypt(KeyId=key_id, Plaintext=b"over tls")
        assert denied.value.response["Error"]["Code"] == "AccessDeniedException"
        _plain_http_fails(srv.port)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert _banner(log).startswith(f"{BANNER}https://127.0.0.1:{srv.port} ")


def test_tls_from_the_command_line(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    cert, key = _self_signed(tmp_path / "tls")
    log = tmp_path / "server.log"
    srv = _serve(env, log, "1", "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        url = f"https://127.0.0.1:{srv.port}"
        stores = _kms(env, url, cert).describe_custom_key_stores()["CustomKeyStores"]
        assert [s["CustomKeyStoreId"] for s in stores] == [env.store_id]
        _plain_http_fails(srv.port)
    finally:
        srv.stop()
    assert _banner(log).startswith(f"{BANNER}https://127.0.0.1:{srv.port} ")


def test_half_a_tls_pair_is_a_configuration_error(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    _self_signed(env.root / "tls")
    _set_service(env, 'tls_cert = "tls/cert.pem"\n')
    done = _run_serve(env)
    assert done.returncode == 2, done.stderr
    assert "'tls_key'" in done.stderr
    assert "[service]" in done.stderr


def test_plain_http_beyond_loopback_needs_insecure_http(tmp_path: Path) -> None:
    env = init_env(tmp_path / "env")
    _set_service(env, 'listen_host = "0.0.0.0"\n')
    text = env.config.read_text()
    env.config.write_text(text.replace('listen_host = "127.0.0.1"\n', "", 1))
    done = _run_serve(env)
    assert done.returncode == 2, done.stderr
    assert INSECURE_MESSAGE in done.stderr
    assert "'0.0.0.0'" in done.stderr
    assert BANNER not in done.stderr  # refused before serving anything

    log = tmp_path / "server.log"
    srv = _serve(env, log, "1", "--insecure-http")
    try:
        status, _ = srv.health()
        assert status == 200
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert _banner(log).startswith(f"{BANNER}http://0.0.0.0:{srv.port} ")
