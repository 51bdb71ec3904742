"""`hsmbridge keystore …` / `hsmbridge key …` through `main(argv)`, on a real SoftHSM2 token, and
`hsmbridge init` twice in a subprocess (it provisions its own SoftHSM token directory, which the
SoftHSM library already loaded in this process could not see).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hsmbridge.identity.iam import IamDirectory
from hsmbridge.main import main
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REPO, KmsEnv
from tests.output_shapes import output_validate

pytestmark = pytest.mark.softhsm

SPEC_FIELDS = {
    "AWSAccountId", "Arn", "CreationDate", "Description", "Enabled", "KeyId", "KeyManager",
    "KeyState", "KeyUsage", "KeySpec", "CustomerMasterKeySpec", "EncryptionAlgorithms",
    "MultiRegion", "Origin", "CloudHsmClusterId", "CustomKeyStoreId",
}  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object, str]:
    """(exit code, parsed stdout JSON or None, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def cmd(env: KmsEnv, group: str, name: str, *opts: str) -> list[str]:
    return [group, name, "--config", str(env.config_path), *opts]


def test_keystore_and_key_commands_end_to_end(make_kms_env, capsys, tmp_path: Path) -> None:
    env = make_kms_env(store=False)
    env.close()  # the CLI is the only user of the token in this test
    pw_file = tmp_path / "pw"
    pw_file.write_text(env.password + "\n")
    anchor = f"file://{env.root / 'customerCA.crt'}"

    create = cmd(env, "keystore", "create", "--custom-key-store-name", "CliStore",
        "--cloud-hsm-cluster-id", env.cluster_id, "--trust-anchor-certificate", anchor,
        "--key-store-password-file", str(pw_file))  # fmt: skip
    code, out, _ = run(capsys, *create)
    assert code == 0
    assert set(out) == {"CustomKeyStoreId"}
    sid = out["CustomKeyStoreId"]
    assert output_validate("CreateCustomKeyStore", out) == []

    code, out, _ = run(capsys, *cmd(env, "keystore", "describe"))
    assert code == 0
    assert output_validate("DescribeCustomKeyStores", out) == []
    assert set(out) == {"CustomKeyStores"}  # all pages, like `aws kms`: no Truncated, no marker
    [store] = out["CustomKeyStores"]
    assert (store["CustomKeyStoreId"], store["ConnectionState"]) == (sid, "DISCONNECTED")
    assert store["TrustAnchorCertificate"] == env.pki.ca_cert_pem

    code, out, err = run(capsys, *cmd(env, "keystore", "connect", "--custom-key-store-id", sid))
    assert (code, out) == (0, {})
    assert "CONNECTED" in err

    code, out, _ = run(capsys, *cmd(env, "key", "create", "--origin", "AWS_CLOUDHSM",
        "--custom-key-store-id", sid, "--description", "from the CLI",
        "--tags", "TagKey=team,TagValue=hsm", "TagKey=env,TagValue=test"))  # fmt: skip
    assert code == 0
    assert set(out) == {"KeyMetadata"}
    meta = out["KeyMetadata"]
    assert set(meta) == SPEC_FIELDS
    assert output_validate("CreateKey", out) == []
    assert (meta["Origin"], meta["KeyState"], meta["CustomKeyStoreId"]) == (
        "AWS_CLOUDHSM", "Enabled", sid,
    )  # fmt: skip
    assert meta["Description"] == "from the CLI"
    second = run(capsys, *cmd(env, "key", "create", "--origin", "AWS_CLOUDHSM",
        "--custom-key-store-id", sid))[1]["KeyMetadata"]["KeyId"]  # fmt: skip

    code, out, _ = run(capsys, *cmd(env, "key", "describe", "--key-id", meta["Arn"]))
    assert (code, out) == (0, {"KeyMetadata": meta})

    code, out, _ = run(capsys, *cmd(env, "key", "list", "--limit", "1"))
    assert code == 0
    assert output_validate("ListKeys", out) == []
    assert out["Truncated"] is True
    code, rest, _ = run(capsys, *cmd(env, "key", "list", "--marker", out["NextMarker"]))
    assert rest["Truncated"] is False
    assert "NextMarker" not in rest
    listed = {k["KeyId"] for k in out["Keys"] + rest["Keys"]}
    assert listed == {meta["KeyId"], second}
    # Without --limit/--marker every page, merged, like `aws kms list-keys`: `Keys` only.
    code, every, _ = run(capsys, *cmd(env, "key", "list"))
    assert (code, set(every)) == (0, {"Keys"})
    assert {k["KeyId"] for k in every["Keys"]} == listed

    code, out, _ = run(capsys, *cmd(env, "keystore", "update", "--custom-key-store-id", sid,
        "--new-custom-key-store-name", "Renamed"))  # fmt: skip
    assert (code, out) == (0, {})
    code, out, _ = run(capsys, *cmd(env, "keystore", "describe",
        "--custom-key-store-name", "Renamed"))  # fmt: skip
    assert out["CustomKeyStores"][0]["CustomKeyStoreId"] == sid

    code, out, _ = run(capsys, *cmd(env, "keystore", "disconnect", "--custom-key-store-id", sid))
    assert (code, out) == (0, {})
    code, out, _ = run(capsys, *cmd(env, "key", "describe", "--key-id", second))
    assert out["KeyMetadata"]["KeyState"] == "Unavailable"
    assert out["KeyMetadata"]["Enabled"] is False

    # Delete refuses while keys exist: one line naming the KMS exception, exit 2.
    code, out, err = run(capsys, *cmd(env, "keystore", "delete", "--custom-key-store-id", sid))
    assert (code, out) == (2, None)
    assert err.startswith("CustomKeyStoreHasCMKsException: ")
    assert err.count("\n") == 1
    assert env.password not in capsys.readouterr().out


def test_errors_print_one_line_and_exit_non_zero(kms_env, capsys, tmp_path: Path) -> None:
    env = kms_env  # its service stays open: the CLI shares the process's login to the token
    sid = env.store_id
    cases = [
        (cmd(env, "key", "create", "--origin", "AWS_CLOUDHSM",
             "--custom-key-store-id", "cks-00000000000000000"),
         "CustomKeyStoreNotFoundException"),
        (cmd(env, "key", "create", "--custom-key-store-id", sid, "--origin", "AWS_CLOUDHSM",
             "--key-spec", "RSA_2048"), "UnsupportedOperationException"),
        (cmd(env, "key", "create", "--custom-key-store-id", sid, "--origin", "AWS_CLOUDHSM",
             "--multi-region"), "UnsupportedOperationException"),
        (cmd(env, "key", "describe", "--key-id", "1234abcd-12ab-34cd-56ef-1234567890ab"),
         "NotFoundException"),
        (cmd(env, "key", "list", "--limit", "0"), "ValidationException"),
        (cmd(env, "keystore", "describe", "--custom-key-store-id", "cks-00000000000000000"),
         "CustomKeyStoreNotFoundException"),
        (cmd(env, "keystore", "delete", "--custom-key-store-id", sid),
         "CustomKeyStoreInvalidStateException"),
        (cmd(env, "keystore", "update", "--custom-key-store-id", sid,
             "--key-store-password", "another1"), "CustomKeyStoreInvalidStateException"),
        (cmd(env, "keystore", "create", "--custom-key-store-name", "X",
             "--cloud-hsm-cluster-id", env.cluster_id, "--trust-anchor-certificate", "junk",
             "--key-store-password", "whatever1"), "CloudHsmClusterInUseException"),
    ]  # fmt: skip
    for argv, exception in cases:
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, None), argv
        assert err.startswith(f"{exception}: "), err
        assert err.count("\n") == 1, err
        assert "Traceback" not in err
        assert "whatever1" not in err
        assert "another1" not in err
    # The service in this process is unaffected by the CLI's open/close of the same token.
    assert env.svc.crypto.generate_random(ADMIN, 8, sid)

    code, _, err = run(capsys, "key", "list", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert err.startswith("error: ")
    assert "missing.toml" in err
    with pytest.raises(SystemExit) as caught:  # argparse usage error
        main(["key", "describe", "--config", str(env.config_path)])
    assert caught.value.code == 2
    capsys.readouterr()


def test_connect_that_ends_failed_exits_1(kms_env, capsys) -> None:
    env, sid = kms_env, kms_env.store_id
    env.svc.keystores.disconnect(ADMIN, sid)
    env.close()
    os.environ["HSMBRIDGE_KEY_STORE_PASSWORD"] = "wrongpass1"
    try:
        code, out, _ = run(capsys, *cmd(env, "keystore", "update", "--custom-key-store-id", sid))
    finally:
        del os.environ["HSMBRIDGE_KEY_STORE_PASSWORD"]
    assert (code, out) == (0, {})
    code, out, err = run(capsys, *cmd(env, "keystore", "connect", "--custom-key-store-id", sid))
    assert (code, out) == (1, {})
    assert "FAILED (INVALID_CREDENTIALS)" in err
    assert "wrongpass1" not in err
    code, out, _ = run(capsys, *cmd(env, "keystore", "describe", "--custom-key-store-id", sid))
    [store] = out["CustomKeyStores"]
    assert (store["ConnectionState"], store["ConnectionErrorCode"]) == (
        "FAILED", "INVALID_CREDENTIALS",
    )  # fmt: skip
    code, _, err = run(capsys, *cmd(env, "keystore", "connect", "--custom-key-store-id", sid))
    assert code == 2
    assert err.startswith("CustomKeyStoreInvalidStateException: ")


def _init(data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "hsmbridge", "init", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_init_twice_is_idempotent_and_keeps_secrets_private(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    first = _init(data)
    assert first.returncode == 0, first.stderr
    files = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    iam_file = data / "iam" / "111122223333.json"
    iam_first = iam_file.read_bytes()
    second = _init(data)
    assert second.returncode == 0, second.stderr

    def store_line(out: str) -> str:
        return next(line for line in out.splitlines() if "custom key store:" in line)

    assert store_line(first.stdout) == store_line(second.stdout)
    assert "CONNECTED" in store_line(second.stdout)
    for name in ("hsmbridge.toml", "clusters.json", "customerCA.crt", "kmsuser.password",
                 "credentials", "softhsm-so.pin", "master.key", "sts.key"):  # fmt: skip
        assert (data / name).read_bytes() == files[name], name  # reused, not rewritten
    assert iam_file.read_bytes() == iam_first
    assert stat.S_IMODE(iam_file.stat().st_mode) == 0o600
    admin = IamDirectory(data / "iam").user("arn:aws:iam::111122223333:user/hsmbridge-admin")
    assert admin is not None
    assert [p.label for p in admin.policies] == [
        "inline policy AllowEverything of user/hsmbridge-admin"
    ]
    for name in ("kmsuser.password", "credentials", "softhsm-so.pin", "master.key",
                 "sts.key", "metadata.sqlite3", "audit.jsonl"):  # fmt: skip
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    doc = json.loads((data / "clusters.json").read_text())
    [cluster] = doc["Clusters"]
    assert cluster["State"] == "ACTIVE"
    hsms = cluster["Hsms"]
    assert [h["State"] for h in hsms] == ["ACTIVE", "ACTIVE"]
    assert len({h["AvailabilityZone"] for h in hsms}) == 2
    password = (data / "kmsuser.password").read_text().strip()
    assert password not in first.stdout + first.stderr + second.stdout + second.stderr
    # The demo secret access key is printed once, by the run that created it.
    creds = dict(
        line.split(" = ", 1) for line in (data / "credentials").read_text().splitlines()
        if " = " in line
    )  # fmt: skip
    secret, akid = creds["aws_secret_access_key"], creds["aws_access_key_id"]
    assert f"AWS_SECRET_ACCESS_KEY={secret}" in first.stdout
    assert secret not in second.stdout + second.stderr
    assert f"AWS_ACCESS_KEY_ID={akid}" in second.stdout
    assert f"secret: unchanged, in {data.resolve() / 'credentials'}" in second.stdout


def test_key_create_writes_the_consoles_key_policy(kms_env, capsys) -> None:
    env = kms_env
    store_id = env.store_id
    assert store_id is not None
    env.close()  # the CLI is the only user of the token while it runs
    admin = f"arn:aws:iam::{ACCOUNT}:user/tester"
    code, out, err = run(capsys, *cmd(env, "key", "create", "--origin", "AWS_CLOUDHSM",
        "--custom-key-store-id", store_id, "--key-administrators", admin, "--key-users", admin,
        "--external-accounts", "444455556666", "--no-administrator-delete"))  # fmt: skip
    assert code == 0, err
    key_id = out["KeyMetadata"]["KeyId"]
    policy = json.loads(env.open().policies.get(ADMIN, key_id, None))
    assert [s["Sid"] for s in policy["Statement"]] == [
        "Enable IAM User Permissions",
        "Allow access for Key Administrators",
        "Allow use of the key",
        "Allow attachment of persistent resources",
    ]
    admins = policy["Statement"][1]
    assert admins["Principal"] == {"AWS": admin}
    assert "kms:ScheduleKeyDeletion" not in admins["Action"]
    assert policy["Statement"][2]["Principal"] == {"AWS": [admin, "arn:aws:iam::444455556666:root"]}
    assert policy["Statement"][3]["Condition"] == {"Bool": {"kms:GrantIsForAWSResource": "true"}}
    env.close()
    # The generator's options and --policy exclude each other; a bad account id is refused.
    code, _, err = run(capsys, *cmd(env, "key", "create", "--custom-key-store-id", store_id,
        "--policy", "{}", "--key-users", admin))  # fmt: skip
    assert (code, err.split(":")[0]) == (2, "ValidationException")
    code, _, err = run(capsys, *cmd(env, "key", "create", "--custom-key-store-id", store_id,
        "--external-accounts", "12345"))  # fmt: skip
    assert (code, err.split(":")[0]) == (2, "ValidationException")
