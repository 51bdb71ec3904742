"""Option (b): the KMS keys come from a KMS endpoint through boto3 (hsmbridge's own HTTP server
here, real AWS KMS in staging), in --keystore mode and in the standalone --cluster mode whose
kmsuser password comes from a file or the environment, never from argv or into any output."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsmbridge.http.compose import create_app
from hsmbridge.http.server import ThreadedServer
from tests.audit.conftest import create_keys, delete_object, drop_metadata_row, keygen
from tests.harness import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = pytest.mark.softhsm


@pytest.fixture
def endpoint(kms_env, monkeypatch) -> Iterator[str]:
    """hsmbridge's HTTP server over the env's metadata and token; boto3 credentials in env."""
    runtime = create_app(kms_env.settings, clock=kms_env.clock, sweep_interval_s=None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        with ThreadedServer(runtime.app) as server:
            yield server.endpoint_url
    finally:
        runtime.close()


def _problems(env) -> None:
    """One of each judged finding: orphan, missing, duplicate + non-compliant, foreign label."""
    _, orphan, missing, dup = create_keys(env, 4)
    drop_metadata_row(env, orphan)
    delete_object(env, missing)
    keygen(env, dup, "--extractable")
    keygen(env, "arn:aws:kms:eu-west-1:999988887777:key/1b4e28ba-2fa1-11d2-883f-0016d3cca427")


def _comparable(result) -> list[tuple]:
    # detail may legitimately differ (only hsmbridge's metadata knows deletion tombstones)
    return sorted(
        (f["kind"], f["severity"], f["key_id"], f["handle"] or -1, f["label"])
        for f in result.json["findings"]
    )


def test_kms_endpoint_source_gives_the_same_findings_as_metadata(kms_env, audit, endpoint):
    _problems(kms_env)
    from_metadata = audit(kms_env)
    from_kms = audit(kms_env, "--source", "kms", "--kms-endpoint-url", endpoint)
    assert from_kms.json["source"] == "kms"
    assert from_kms.json["kmsKeys"] == from_metadata.json["kmsKeys"] == 3
    assert _comparable(from_kms) == _comparable(from_metadata)
    assert {f[0] for f in _comparable(from_kms)} == {
        "orphaned_material",
        "missing_material",
        "duplicate_label",
        "non_compliant",
        "id_mismatch",
        "foreign_label",
    }
    assert from_kms.code == from_metadata.code == 1


def _standalone(env, endpoint, *extra):
    return [
        "audit",
        "--config",
        str(env.config_path),
        "--cluster",
        env.cluster_id,
        "--kms-endpoint-url",
        endpoint,
        "--region",
        REGION,
        "--output",
        "json",
        *extra,
    ]


def test_standalone_cluster_mode_with_password_file(kms_env, audit, endpoint, run_cli, tmp_path):
    _problems(kms_env)
    secret = tmp_path / "kmsuser.pw"
    secret.write_text(kms_env.current_password() + "\n")
    secret.chmod(0o600)
    result = run_cli(*_standalone(kms_env, endpoint, "--password-file", str(secret)))
    assert result.code == 1, result.err
    assert result.json["clusterId"] == kms_env.cluster_id
    assert result.json["customKeyStoreId"] is None  # filtered on CloudHsmClusterId instead
    assert _comparable(result) == _comparable(audit(kms_env))
    assert kms_env.current_password() not in result.out + result.err


def test_standalone_password_from_env_and_delete_orphans(kms_env, endpoint, run_cli, monkeypatch):
    [_, orphan] = create_keys(kms_env, 2)
    drop_metadata_row(kms_env, orphan)
    monkeypatch.setenv("HSMBRIDGE_KMSUSER_PASSWORD", kms_env.current_password())
    argv = _standalone(kms_env, endpoint, "--yes")
    argv.insert(1, "delete-orphans")
    result = run_cli(*argv)
    assert result.code == 0, result.err
    assert [(o["arn"], o["outcome"]) for o in result.json["orphans"]] == [(orphan, "deleted")]
    log = kms_env.settings.audit_log.read_text()
    assert orphan in log
    assert kms_env.current_password() not in log + result.out + result.err
    assert run_cli(*_standalone(kms_env, endpoint)).code == 0


def _refused(run_cli, capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_password_is_refused_on_the_command_line_and_required(kms_env, endpoint, run_cli, capsys):
    pw = kms_env.password
    for extra in (("--password", pw), (f"--password={pw}",)):
        err = _refused(run_cli, capsys, _standalone(kms_env, endpoint, *extra))
        assert "never taken from the command line" in err
        assert pw not in err
    # No abbreviation of --password-file: `--pass X` must not read a file named like the password.
    err = _refused(run_cli, capsys, _standalone(kms_env, endpoint, "--pass", pw))
    assert "No such file" not in err
    no_password = run_cli(*_standalone(kms_env, endpoint))
    assert no_password.code == 2
    assert "HSMBRIDGE_KMSUSER_PASSWORD" in no_password.err


def test_wrong_password_is_unreachable_exit_3_without_echoing_it(
    kms_env, endpoint, run_cli, monkeypatch
):
    wrong = "not-the-kmsuser-password-42"
    monkeypatch.setenv("HSMBRIDGE_KMSUSER_PASSWORD", wrong)
    result = run_cli(*_standalone(kms_env, endpoint))
    assert result.code == 3
    assert "LoginError" in result.err
    assert wrong not in result.out + result.err


def test_wrong_password_file_is_login_refused_exit_3(kms_env, endpoint, run_cli, tmp_path):
    create_keys(kms_env, 1)
    right, wrong = tmp_path / "right.pw", tmp_path / "wrong.pw"
    right.write_text(kms_env.current_password() + "\n")
    wrong.write_text("not-the-kmsuser-password-43\n")
    control = run_cli(*_standalone(kms_env, endpoint, "--password-file", str(right)))
    assert control.code == 0, control.err  # same endpoint, same token: only the file differs
    result = run_cli(*_standalone(kms_env, endpoint, "--password-file", str(wrong)))
    assert result.code == 3, result.err
    assert result.out == ""
    assert "unreachable: LoginError" in result.err
    assert "not-the-kmsuser-password-43" not in result.err


def test_unreachable_kms_endpoint_exits_3(kms_env, audit, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no retry backoff in the test
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    create_keys(kms_env, 1)
    result = audit(kms_env, "--kms-endpoint-url", "http://127.0.0.1:9")
    assert result.code == 3
    assert "KmsSourceUnreachableError" in result.err
