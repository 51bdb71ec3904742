"""`hsmbridge init --data-dir DIR`: a complete local environment on SoftHSM2 (or on the CloudHSM
stand-in over it), idempotently.

Owns: writing the demo environment; what it writes, file by file, is `DESCRIPTION` (the command's
`--help`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

from hsmbridge.bootstrap.sessions import load_or_create_session_key, session_key_path
from hsmbridge.cli.runner import cli_caller, open_cli_service, run_audited
from hsmbridge.config import load_settings, mask_url, parse_metadata_url
from hsmbridge.errors import ConfigError, CustomKeyStoreNotFoundException
from hsmbridge.identity.iam import write_demo_iam
from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.model import ConnectionState
from hsmbridge.request import RequestContext
from hsmbridge.service.kms import KmsService

STORE_NAME = "ExampleKeyStore"
DEFAULT_ACCOUNT = "111122223333"
DEFAULT_REGION = "us-east-1"
DEFAULT_PORT = 4599
_ALNUM = string.ascii_letters + string.digits
HSM_CHOICES = ("softhsm2", "cloudhsm-shim")
SHIM_CONF = "cloudhsm-shim.conf"

DESCRIPTION = """\
Set up a complete local environment in DIR on SoftHSM2, then create the custom key store
ExampleKeyStore on the demo cluster and connect it. Running it again reuses everything that exists.
With --hsm cloudhsm-shim the cluster is reached through the CloudHSM stand-in instead: a PKCS#11
module (built from softhsm/cloudhsm-shim/) that behaves like AWS CloudHSM's SDK 5 library over the
same SoftHSM2 token, and the `cloudhsm` profile.

files written in DIR:
  hsmbridge.toml    the configuration every command takes with --config
  softhsm2.conf     SoftHSM2's configuration; its token directory is DIR/tokens
  tokens/           the SoftHSM2 token that plays the demo cluster (label = the cluster id)
  clusters.json     the cluster inventory, in `aws cloudhsmv2 describe-clusters` shape: one ACTIVE
                    cluster with two ACTIVE HSMs in two Availability Zones; edit it to change an
                    HSM's state or AZ (re-read at every check)
  customerCA.crt    the trust anchor that signed the demo cluster certificate
  kmsuser.password  (0600) the demo kmsuser password (the token's user PIN)
  softhsm-so.pin    (0600) the token's security-officer PIN, for resetting kmsuser's password
  cloudhsm-shim.conf, cloudhsm-shim-state/  (--hsm cloudhsm-shim) the stand-in's settings and
                    its record of failed and current logins; writing `throttle_rate = 0.2`,
                    `latency_ms = 50`, `down = 1` or `key_availability_fails = 1` into
                    cloudhsm-shim.faults injects CloudHSM's failures while the service runs
  credentials       (0600) AWS shared-credentials file: the local principal for the HTTP API
  iam/ACCOUNT.json  (0600) the account's IAM, in `aws iam get-account-authorization-details`
                    shape: the demo administrator may do everything; add users, groups, roles
                    and policies here (or paste a real export), re-read when it changes
  master.key        (0600) seals the kmsuser passwords stored in the metadata
  sts.key           (0600) signs STS session credentials
  metadata.sqlite3, audit.jsonl  (0600) created by the service itself

With --metadata-url postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE the configuration keeps the
metadata in that PostgreSQL database instead of metadata.sqlite3 (for several instances sharing
it); hsmbridge.toml is then written 0600 when the URL carries a password. An existing
hsmbridge.toml is kept as it is.
"""


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = top.add_parser(
        "init",
        help="set up a local demo environment (SoftHSM2 + SQLite)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir", type=Path, required=True, metavar="DIR", help="where to write everything"
    )
    p.add_argument(
        "--region",
        default=DEFAULT_REGION,
        metavar="REGION",
        help="the demo's AWS region (%(default)s)",
    )
    p.add_argument(
        "--account-id",
        default=DEFAULT_ACCOUNT,
        metavar="ACCOUNT",
        help="the demo's 12-digit AWS account id (%(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        metavar="PORT",
        help="the port `hsmbridge serve` listens on, written to hsmbridge.toml (%(default)s)",
    )
    p.add_argument(
        "--metadata-url",
        metavar="URL",
        help="where the metadata lives, written to hsmbridge.toml: postgresql://... or "
        "sqlite:///PATH (default: SQLite in DIR)",
    )
    p.add_argument(
        "--hsm",
        choices=HSM_CHOICES,
        default="softhsm2",
        help="softhsm2 (default): the token through SoftHSM2 itself; cloudhsm-shim: through the "
        "CloudHSM stand-in, with the `cloudhsm` profile (needs a C compiler: bash "
        "softhsm/bootstrap.sh shim)",
    )
    p.set_defaults(handler=run)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _secret_file(path: Path, size: int) -> str:
    if not path.exists():
        _write_secret(path, "".join(secrets.choice(_ALNUM) for _ in range(size)) + "\n")
    return path.read_text(encoding="utf-8").strip()


def _softhsm_dir() -> Path:
    here = Path(__file__).resolve().parent.parent.parent / "softhsm"
    if not (here / "init-token.sh").is_file():
        raise ConfigError(f"softhsm/init-token.sh not found next to the package ({here})")
    return here


def _cluster(data: Path, region: str) -> tuple[str, str]:
    """The demo cluster id and its trust anchor, created once."""
    inventory, anchor = data / "clusters.json", data / "customerCA.crt"
    if inventory.exists() and anchor.exists():
        doc: dict[str, Any] = json.loads(inventory.read_text(encoding="utf-8"))
        return str(doc["Clusters"][0]["ClusterId"]), anchor.read_text(encoding="utf-8")
    cluster_id = new_cluster_id()
    pki = make_demo_pki(cluster_id)
    spec = DemoClusterSpec(cluster_id, pki.cluster_cert_pem, region=region)
    inventory.write_text(json.dumps(describe_clusters_document([spec]), indent=2) + "\n")
    anchor.write_text(pki.ca_cert_pem)
    return cluster_id, pki.ca_cert_pem


def _token(data: Path, cluster_id: str, password: str) -> None:
    if shutil.which("softhsm2-util") is None:
        raise ConfigError("softhsm2-util is not installed: apt-get install softhsm2 opensc")
    so_pin = _secret_file(data / "softhsm-so.pin", 16)
    env = {**os.environ, "HSMBRIDGE_SO_PIN": so_pin, "HSMBRIDGE_USER_PIN": password}
    script = _softhsm_dir() / "init-token.sh"
    subprocess.run(
        ["sh", str(script), str(data / "softhsm2.conf"), cluster_id],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _shim(data: Path, cluster_id: str) -> Path:
    """Build the CloudHSM stand-in (if not built yet) and write its settings; its library."""
    build = _softhsm_dir() / "cloudhsm-shim" / "build.sh"
    done = subprocess.run(["sh", str(build)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            f"cannot build the CloudHSM stand-in ({why[0]}); run `bash softhsm/bootstrap.sh "
            "shim` first, which installs a C compiler and the PKCS#11 header"
        )
    conf = data / SHIM_CONF
    if not conf.exists():
        conf.write_text(
            "# The CloudHSM stand-in's settings (softhsm/cloudhsm-shim/cloudhsm_shim.c).\n"
            "target = /usr/lib/softhsm/libsofthsm2.so\n"
            "state_dir = cloudhsm-shim-state\n"
            f"token_label = {cluster_id}\n"
            "# CloudHSM locks a crypto user after 5 failed logins in a row.\n"
            "lockout_threshold = 5\n"
            "faults = cloudhsm-shim.faults\n",
            encoding="utf-8",
        )
    return Path(done.stdout.strip())


def _credentials(data: Path, account: str, region: str) -> tuple[str, str, str, bool]:
    """The demo access key pair, its principal ARN, and whether this run wrote them (once)."""
    path = data / "credentials"
    created = not path.exists()
    if created:
        akid = "AKIA" + "".join(
            secrets.choice(string.ascii_uppercase + "234567") for _ in range(16)
        )
        secret = "".join(secrets.choice(_ALNUM + "/+") for _ in range(40))
        _write_secret(
            path,
            (
                "[default]\n"
                f"aws_access_key_id = {akid}\n"
                f"aws_secret_access_key = {secret}\n"
                f"principal_arn = arn:aws:iam::{account}:user/hsmbridge-admin\n"
                f"region = {region}\n"
            ),
        )
    fields = dict(
        line.split(" = ", 1)
        for line in path.read_text(encoding="utf-8").splitlines()
        if " = " in line
    )
    return (
        fields["aws_access_key_id"],
        fields["aws_secret_access_key"],
        fields["principal_arn"].strip(),
        created,
    )


def _iam(data: Path, account: str, admin_arn: str) -> Path:
    """The account's IAM file, written once: the demo administrator may do everything."""
    path = data / "iam" / f"{account}.json"
    if not path.exists() and f":iam::{account}:user/" in admin_arn:
        write_demo_iam(path, account, admin_arn)
    return path


def _metadata_table(url: str | None) -> str:
    """The `[metadata]` table for `url` (none: the SQLite default), checked before anything uses
    it. json.dumps gives a valid TOML basic string for any URL (quotes, backslashes escaped)."""
    if url is None:
        return ""
    try:
        parse_metadata_url(url)
    except ConfigError as exc:
        raise ConfigError(f"--metadata-url: {exc}") from None
    return f"[metadata]\nurl = {json.dumps(url)}\n\n"


def _config(
    data: Path,
    cluster_id: str,
    region: str,
    account: str,
    port: int,
    *,
    metadata: str | None,
    shim: Path | None = None,
) -> Path:
    path = data / "hsmbridge.toml"
    if path.exists():
        return path
    shim_cli = _softhsm_dir() / "cloudhsm-shim" / "cloudhsm-cli"
    if shim is None:
        hsm_env, binding = "", f'profile = "softhsm2"\ntoken_label = "{cluster_id}"\n'
    else:
        # Like a real CloudHSM cluster: one slot, no token label to name (the stand-in shows
        # only this cluster's token).
        hsm_env = f'HSMBRIDGE_SHIM_CONF = "{SHIM_CONF}"\n'
        rotate = [str(shim_cli), "user", "change-password", "--username", "{user}"]
        rotate += ["--role", "crypto-user"]
        binding = (
            f'profile = "cloudhsm"\nmodule_path = {json.dumps(str(shim))}\n'
            f"password_change_command = {json.dumps(rotate)}\n"
        )
    text = (
        "# Written by `hsmbridge init`; see hsmbridge/cli/init_cmd.py for every file here.\n"
        "[service]\n"
        f'region = "{region}"\n'
        f'account_id = "{account}"\n'
        'listen_host = "127.0.0.1"\n'
        f"listen_port = {port}\n\n"
        f"{_metadata_table(metadata)}"
        "[inventory]\n"
        'provider = "static"\n'
        'path = "clusters.json"\n\n'
        "[hsm.env]\n"
        'SOFTHSM2_CONF = "softhsm2.conf"\n'
        f"{hsm_env}\n"
        "[[clusters]]\n"
        f'cluster_id = "{cluster_id}"\n'
        f"{binding}"
    )
    # WARNING: a metadata URL with a password makes the configuration a secret file.
    secret = metadata is not None and mask_url(metadata) != metadata
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def _store(config: Path, cluster_id: str, anchor: str, password: str) -> tuple[str, str]:
    """Create (or reuse) ExampleKeyStore and connect it; returns its id and connection state."""
    settings = load_settings(config)
    caller = cli_caller(settings)
    service, sink = open_cli_service(settings)
    try:
        # KMS's own create is idempotent only for a DISCONNECTED store; ours is CONNECTED after
        # the first run, so reuse the store by name instead of asking to create it again.
        # Create and connect go through the operation table like `hsmbridge keystore ...`, so
        # they are validated, authorized and written to the audit trail the same way.
        store_id = _existing_store(service, caller) or str(
            run_audited(
                service,
                sink,
                caller,
                "CreateCustomKeyStore",
                {
                    "CustomKeyStoreName": STORE_NAME,
                    "CloudHsmClusterId": cluster_id,
                    "TrustAnchorCertificate": anchor,
                    "KeyStorePassword": password,
                },
            )["CustomKeyStoreId"]
        )
        state = service.keystores.describe(caller, store_id).items[0].connection_state
        if state is ConnectionState.DISCONNECTED:
            run_audited(
                service, sink, caller, "ConnectCustomKeyStore", {"CustomKeyStoreId": store_id}
            )
        store = service.keystores.describe(caller, store_id).items[0]
        code = store.connection_error_code
        return store_id, store.connection_state.value + (f" ({code.value})" if code else "")
    finally:
        service.close()
        sink.close()


def _existing_store(service: KmsService, caller: RequestContext) -> str | None:
    try:
        return service.keystores.describe(caller, name=STORE_NAME).items[0].store_id
    except CustomKeyStoreNotFoundException:
        return None


def run(args: argparse.Namespace) -> int:
    data: Path = args.data_dir.resolve()
    _metadata_table(args.metadata_url)  # refuse a bad URL before writing anything
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster_id, anchor = _cluster(data, args.region)
    password = _secret_file(data / "kmsuser.password", 24)
    _token(data, cluster_id, password)
    akid, secret, admin_arn, created = _credentials(data, args.account_id, args.region)
    iam = _iam(data, args.account_id, admin_arn)
    shim = _shim(data, cluster_id) if args.hsm == "cloudhsm-shim" else None
    config = _config(
        data,
        cluster_id,
        args.region,
        args.account_id,
        args.port,
        metadata=args.metadata_url,
        shim=shim,
    )
    store_id, state = _store(config, cluster_id, anchor, password)
    settings = load_settings(config)
    # Made now rather than at the first `serve`, so a copy of DIR holds every secret: instances
    # that share an endpoint must all sign and check STS sessions with the same key.
    load_or_create_session_key(session_key_path(settings))
    print(f"hsmbridge environment ready in {data}")
    print(f"  config:            {config}")
    print(f"  IAM:               {iam}")
    hsm = "SoftHSM2 token" if shim is None else "CloudHSM stand-in over a SoftHSM2 token"
    print(f"  cluster:           {cluster_id} ({hsm}, 2 ACTIVE HSMs in 2 AZs)")
    print(f"  custom key store:  {store_id} ({STORE_NAME}, {state})")
    print(f"  endpoint:          http://{settings.listen_host}:{settings.listen_port}")
    if created:  # the secret is shown once, when it is made; later runs say where it is
        print(f"  AWS credentials:   AWS_ACCESS_KEY_ID={akid} AWS_SECRET_ACCESS_KEY={secret}")
    else:
        where = data / "credentials"
        print(f"  AWS credentials:   AWS_ACCESS_KEY_ID={akid} (secret: unchanged, in {where})")
    return 0 if state == ConnectionState.CONNECTED.value else 1
