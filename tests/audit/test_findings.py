"""Each finding of the key-label audit produced for real on a SoftHSM2 token, through the CLI."""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import replace

import pytest

from hsmbridge.keystore.demo import (
    DemoClusterSpec,
    describe_clusters_document,
    make_demo_pki,
    new_cluster_id,
)
from hsmbridge.model import KeyLifecycle
from hsmbridge.service.keys import CreateKeyRequest
from tests.audit.conftest import create_keys, delete_object, drop_metadata_row, keygen, pkcs11_tool
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REGION, SOFTHSM2_PROFILE, KmsEnv

pytestmark = pytest.mark.softhsm
DAY = 86_400.0
PROFILE = SOFTHSM2_PROFILE


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


def test_cka_id_changed_with_pkcs11_tool_is_id_mismatch_low(kms_env, audit):
    """hsmbridge's own key, its CKA_ID rewritten by pkcs11-tool: the label still names the KMS
    key, so the key is found, compliant and not missing; only the CKA_ID is reported."""
    [arn] = create_keys(kms_env, 1)
    key_id = arn.rsplit("/", 1)[1]
    other = str(uuid.uuid4())
    pkcs11_tool(kms_env, "--type", "secrkey", "--label", arn, "--set-id", other.encode().hex())
    [found] = audit(kms_env, sub=("find", arn)).json["keys"]
    assert (found["label"], found["key_id"], found["violations"]) == (arn, other, [])

    result = audit(kms_env)
    assert result.code == 0, result.json  # low is below the default --fail-on medium
    [finding] = result.json["findings"]
    assert (finding["kind"], finding["severity"]) == ("id_mismatch", "low")
    assert (finding["arn"], finding["key_id"], finding["handle"]) == (arn, key_id, found["handle"])
    assert other in finding["detail"]
    assert "not the key id in the label" in finding["detail"]
    assert audit(kms_env, "--fail-on", "low").code == 1


def _add_second_store(env: KmsEnv, softhsm_token) -> str:
    """A second cluster (its own SoftHSM token) and custom key store in the env's configuration
    and metadata, as one hsmbridge serving two stores has; returns the new store's id."""
    binding, password = softhsm_token()
    second = new_cluster_id()
    pki = make_demo_pki(second)
    env.config_path.write_text(
        env.config_path.read_text()
        + f'\n[[clusters]]\ncluster_id = "{second}"\nprofile = "{PROFILE}"\n'
        f'token_label = "{binding.profile.token_label}"\n'
    )
    clusters = [
        DemoClusterSpec(env.cluster_id, env.pki.cluster_cert_pem, region=REGION),
        DemoClusterSpec(second, pki.cluster_cert_pem, region=REGION),
    ]
    env.inventory_path.write_text(json.dumps(describe_clusters_document(clusters)))
    svc = env.restart()
    store_id = svc.keystores.create(ADMIN, "SecondStore", second, pki.ca_cert_pem, password)
    svc.keystores.connect(ADMIN, store_id)
    return store_id


def test_material_of_another_stores_live_key_is_misplaced_medium(
    kms_env, softhsm_token, audit, run_cli
):
    """Material on this store's token, labelled (and identified) exactly like a live key of the
    other custom key store, as a key generated in the wrong cluster would be."""
    [own] = create_keys(kms_env, 1)
    other_store = _add_second_store(kms_env, softhsm_token)
    svc = kms_env.svc
    theirs = svc.keys.create(
        ADMIN, CreateKeyRequest(custom_key_store_id=other_store, origin="AWS_CLOUDHSM")
    )
    here = svc.ctx.connections.get(kms_env.store_id, kms_env.cluster_id, kms_env.current_password)
    misplaced = here.generate_key(theirs.arn, theirs.key_id.encode("ascii"))

    result = audit(kms_env)
    assert result.code == 1, result.err  # medium is at the default --fail-on
    [finding] = result.json["findings"]
    assert (finding["kind"], finding["severity"]) == ("misplaced_material", "medium")
    assert (finding["arn"], finding["label"], finding["key_id"]) == (
        theirs.arn,
        theirs.arn,
        theirs.key_id,
    )
    assert finding["handle"] == misplaced.handle
    assert f"live KMS key of custom key store {other_store}" in finding["detail"]
    assert audit(kms_env, "--fail-on", "high").code == 0

    # The other store's own audit is clean: its material is where it belongs.
    theirs_audit = run_cli(
        "audit", "--config", str(kms_env.config_path), "--keystore", other_store, "--output", "json"
    )
    assert theirs_audit.code == 0, theirs_audit.json
    assert theirs_audit.json["findings"] == []
    # Misplaced is not orphaned: delete-orphans destroys nothing here.
    cleanup = audit(kms_env, "--yes", sub=("delete-orphans",))
    assert (cleanup.code, cleanup.json["orphans"]) == (0, [])
    assert sorted(i.label for i in here.list_keys()) == sorted([own, theirs.arn])


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
