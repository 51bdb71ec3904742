"""Each finding of the key-label audit produced for real on a SoftHSM2 token, through the CLI."""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import replace

import pytest

from hsmbridge.model import KeyLifecycle
from tests.audit.conftest import create_keys, delete_object, drop_metadata_row, keygen
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REGION

pytestmark = pytest.mark.softhsm
DAY = 86_400.0


def test_clean_store_exits_0_with_no_findings(kms_env, audit):
    create_keys(kms_env, 3)
    result = audit(kms_env)
    assert result.code == 0, result.err
    doc = result.json
    assert doc["findings"] == []
    assert (doc["hsmObjects"], doc["kmsKeys"], doc["source"]) == (3, 3, "metadata")
    assert "3 HSM object(s) against 3 KMS key(s)" in result.err


def test_material_without_metadata_is_an_orphan_of_medium_severity(kms_env, audit):
    _keep, gone = create_keys(kms_env, 2)
    drop_metadata_row(kms_env, gone)
    result = audit(kms_env)
    assert result.code == 1
    [finding] = result.json["findings"]
    assert (finding["kind"], finding["severity"]) == ("orphaned_material", "medium")
    assert finding["arn"] == finding["label"] == gone
    assert finding["key_id"] == gone.rsplit("/", 1)[1]
    assert isinstance(finding["handle"], int)
    assert "no deletion record" in finding["detail"]
    assert audit(kms_env, "--fail-on", "high").code == 0


def test_material_destroyed_with_pkcs11_tool_is_missing_and_critical(kms_env, audit):
    [arn] = create_keys(kms_env, 1)
    delete_object(kms_env, arn)
    result = audit(kms_env, "--fail-on", "critical")
    assert result.code == 1
    assert result.kinds() == [("missing_material", "critical")]
    [finding] = result.json["findings"]
    assert finding["arn"] == arn
    assert finding["handle"] is None
    assert "KeyState Enabled" in finding["detail"]


def test_second_extractable_key_with_the_same_label_is_duplicate_and_non_compliant(kms_env, audit):
    [arn] = create_keys(kms_env, 1)
    keygen(kms_env, arn, "--extractable")
    result = audit(kms_env)
    assert result.code == 1
    kinds = result.kinds()
    assert kinds.count(("duplicate_label", "high")) == 2
    assert ("non_compliant", "high") in kinds
    assert ("id_mismatch", "low") in kinds  # pkcs11-tool wrote no CKA_ID
    dups = [f for f in result.json["findings"] if f["kind"] == "duplicate_label"]
    assert {f["label"] for f in dups} == {arn}
    assert len({f["handle"] for f in dups}) == 2
    [bad] = [f for f in result.json["findings"] if f["kind"] == "non_compliant"]
    assert "EXTRACTABLE is True" in bad["detail"]
    assert "SENSITIVE is False" in bad["detail"]
    # Only the object pkcs11-tool made breaks the rules; hsmbridge's own key is compliant.
    assert bad["handle"] in {f["handle"] for f in dups}


def test_foreign_and_non_arn_labels_are_reported_low_not_judged(kms_env, audit):
    create_keys(kms_env, 1)
    foreign = f"arn:aws:kms:eu-west-1:999988887777:key/{uuid.uuid4()}"
    other_region = f"arn:aws:kms:us-west-2:{ACCOUNT}:key/{uuid.uuid4()}"
    keygen(kms_env, foreign)
    keygen(kms_env, other_region)
    keygen(kms_env, "payments-app-key", "--extractable")
    keygen(kms_env, f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/not-a-key")
    result = audit(kms_env)
    assert result.code == 0, result.json  # low is below the default --fail-on medium
    assert result.kinds() == [
        ("foreign_label", "low"),
        ("foreign_label", "low"),
        ("not_kms_arn", "low"),
        ("not_kms_arn", "low"),
    ]
    assert audit(kms_env, "--fail-on", "low").code == 1


def test_deletion_completed_while_disconnected_leaves_a_reported_orphan(kms_env, audit):
    svc = kms_env.svc
    _keep, doomed = create_keys(kms_env, 2)
    svc.keys.schedule_deletion(ADMIN, doomed, 7)
    svc.keystores.disconnect(ADMIN, kms_env.store_id)
    kms_env.clock.advance(8 * DAY)
    assert svc.deletions.sweep() == 1
    [tomb] = list(svc.ctx.meta.deleted_keys(kms_env.store_id))
    assert tomb.arn == doomed
    assert tomb.material_deleted is False
    [event] = [e for e in kms_env.audit.events if e.event_name == "DeleteKey"]
    assert event.additional["backingKeysDeletionStatus"][0]["deletionStatus"] == "FAILURE"

    result = audit(kms_env)  # the store is DISCONNECTED: the audit logs in for itself
    assert result.code == 1
    assert "DISCONNECTED" in result.err
    [finding] = result.json["findings"]
    assert (finding["kind"], finding["severity"], finding["arn"]) == (
        "orphaned_material",
        "medium",
        doomed,
    )
    assert "deletion completed" in finding["detail"]
    assert "while the store was disconnected" in finding["detail"]


def test_in_flight_rows_are_info_not_orphans_or_missing(kms_env, audit):
    creating, deleting, never_made = create_keys(kms_env, 3)
    meta = kms_env.svc.ctx.meta
    delete_object(kms_env, never_made)  # a CreateKey that crashed before the HSM call
    with meta.write():
        for arn, lifecycle in (
            (creating, KeyLifecycle.CREATING),
            (deleting, KeyLifecycle.DELETING),
            (never_made, KeyLifecycle.CREATING),
        ):
            record = meta.get_key(arn.rsplit("/", 1)[1])
            meta.put_key(replace(record, lifecycle=lifecycle))
    result = audit(kms_env, "--fail-on", "low")
    assert result.code == 0, result.json
    assert result.kinds() == [("in_flight", "info")] * 3
    details = {f["arn"]: f["detail"] for f in result.json["findings"]}
    assert details[never_made].startswith("CreateKey not finished")
    assert "0 HSM key(s)" in details[never_made]
    assert details[deleting].startswith("deletion not finished")


def test_json_csv_and_table_outputs(kms_env, audit):
    [arn] = create_keys(kms_env, 1)
    drop_metadata_row(kms_env, arn)
    keygen(kms_env, "stray-label")
    as_json = audit(kms_env).json
    rows = list(csv.DictReader(io.StringIO(audit(kms_env, "--output", "csv").out)))
    assert [(r["kind"], r["severity"], r["label"]) for r in rows] == [
        (f["kind"], f["severity"], f["label"]) for f in as_json["findings"]
    ]
    assert rows[0]["handle"].isdigit()
    table = audit(kms_env, "--output", "table").out
    assert table.splitlines()[0].split() == [
        "severity",
        "kind",
        "key_id",
        "handle",
        "label",
        "detail",
    ]
    assert "orphaned_material" in table
    assert "stray-label" in table


def test_progress_bar_goes_to_stderr_only(kms_env, audit):
    create_keys(kms_env, 2)
    result = audit(kms_env, "--progress")
    assert result.code == 0
    assert "checking HSM objects [" in result.err
    assert "2/2" in result.err
    assert result.json["findings"] == []  # stdout stays parseable


def test_usage_errors_exit_2(kms_env, run_cli, audit):
    assert audit(kms_env, "--fail-on", "severe").code == 2
    assert run_cli("audit", "--keystore", kms_env.store_id).code == 2  # no --config
    assert run_cli("audit", "--config", str(kms_env.config_path)).code == 2  # no store
    missing = run_cli(
        "audit", "--config", str(kms_env.config_path), "--keystore", "cks-0123456789abcdef0"
    )
    assert missing.code == 2
    assert "CustomKeyStoreNotFoundException" in missing.err
