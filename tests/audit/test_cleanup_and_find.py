"""`hsmbridge audit delete-orphans` (dry run, --yes, re-checks, audit events) and `audit find`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hsmbridge.audit import (
    AuditScope,
    FindingKind,
    Outcome,
    StoreMetadataSource,
    delete_orphans,
    run_audit,
)
from hsmbridge.model import KeyLifecycle
from tests.audit.conftest import create_keys, drop_metadata_row, keygen
from tests.callers import ADMIN
from tests.harness import ACCOUNT, REGION, MemorySink

pytestmark = pytest.mark.softhsm
DAY = 86_400.0


def _labels(env) -> list[str]:
    backend = env.svc.ctx.connections.get(env.store_id, env.cluster_id, lambda: env.password)
    return sorted(info.label for info in backend.list_keys())


def _cleanup_events(env) -> list[tuple[str, str, dict]]:
    """(key ARN, store id, extra data) of each cleanup event in the JSON-lines audit log.

    Reads both the snake_case record and the CloudTrail-style camelCase one (eventName,
    additionalEventData) the audit log is moving to, so this test pins the content, not the
    field spelling, which trail/events.py owns."""
    found = []
    for line in env.settings.audit_log.read_text().splitlines():
        e = json.loads(line)
        if e.get("eventName", e.get("event_name")) != "DeleteOrphanedKeyMaterial":
            continue
        extra = e.get("additionalEventData", e.get("additional"))
        found.append(
            (
                e.get("keyArn", e.get("key_arn")),
                e.get("customKeyStoreId", e.get("custom_key_store_id")),
                extra,
            )
        )
    return found


def _orphan_two_ways(env) -> tuple[list[str], list[str]]:
    """Keys kept, and orphans: one metadata row dropped, one deletion done while disconnected."""
    keep_a, keep_b, dropped, doomed = create_keys(env, 4)
    drop_metadata_row(env, dropped)
    env.svc.keys.schedule_deletion(ADMIN, doomed, 7)
    env.svc.keystores.disconnect(ADMIN, env.store_id)
    env.clock.advance(8 * DAY)
    env.svc.deletions.sweep()
    env.svc.keystores.connect(ADMIN, env.store_id)
    return [keep_a, keep_b], [dropped, doomed]


def test_dry_run_lists_the_orphans_and_deletes_nothing(kms_env, audit):
    _, orphans = _orphan_two_ways(kms_env)
    before = _labels(kms_env)
    result = audit(kms_env, sub=("delete-orphans",))
    assert result.code == 1  # orphans exist: CI sees them
    doc = result.json
    assert doc["dryRun"] is True
    assert sorted(o["arn"] for o in doc["orphans"]) == sorted(orphans)
    assert {o["outcome"] for o in doc["orphans"]} == {"would_delete"}
    assert "--yes" in result.err
    assert _labels(kms_env) == before


def test_yes_destroys_exactly_the_orphans_then_the_audit_is_clean(kms_env, audit):
    kept, orphans = _orphan_two_ways(kms_env)
    foreign = "arn:aws:kms:eu-west-1:999988887777:key/1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    keygen(kms_env, foreign)
    keygen(kms_env, "someone-elses-key", "--extractable")
    result = audit(kms_env, "--yes", sub=("delete-orphans",))
    assert result.code == 0, result.err
    outcomes = {o["arn"]: o["outcome"] for o in result.json["orphans"]}
    assert outcomes == dict.fromkeys(orphans, "deleted")
    assert _labels(kms_env) == sorted([*kept, foreign, "someone-elses-key"])

    cleanup = _cleanup_events(kms_env)
    assert sorted(arn for arn, _, _ in cleanup) == sorted(orphans)
    for _, store_id, extra in cleanup:
        assert store_id == kms_env.store_id
        assert extra["objectsDestroyed"] == 1
        assert extra["clusterId"] == kms_env.cluster_id
        assert kms_env.password not in json.dumps(extra)

    again = audit(kms_env)  # foreign and non-ARN labels remain, reported low only
    assert again.code == 0
    assert {f["kind"] for f in again.json["findings"]} == {"foreign_label", "not_kms_arn"}


def test_only_orphans_ever_go_even_with_other_findings_around(kms_env, audit):
    live, dup_of, creating, dropped = create_keys(kms_env, 4)
    keygen(kms_env, dup_of, "--extractable")  # duplicate + non-compliant, of a live key
    meta = kms_env.svc.ctx.meta
    with meta.write():
        record = meta.get_key(creating.rsplit("/", 1)[1])
        meta.put_key(replace(record, lifecycle=KeyLifecycle.CREATING))
    drop_metadata_row(kms_env, dropped)
    result = audit(kms_env, "--yes", sub=("delete-orphans",))
    assert result.code == 0
    assert [o["arn"] for o in result.json["orphans"]] == [dropped]
    assert _labels(kms_env) == sorted([live, dup_of, dup_of, creating])


def test_recheck_skips_an_orphan_whose_key_came_back(kms_env):
    svc = kms_env.svc
    [arn] = create_keys(kms_env, 1)
    record = svc.ctx.meta.get_key(arn.rsplit("/", 1)[1])
    drop_metadata_row(kms_env, arn)
    backend = svc.ctx.connections.get(kms_env.store_id, kms_env.cluster_id, lambda: "unused")
    scope = AuditScope("aws", ACCOUNT, REGION, kms_env.store_id, kms_env.cluster_id)
    source = StoreMetadataSource(svc.ctx.meta, kms_env.store_id)
    report = run_audit(backend, source, scope)
    [orphan] = report.of_kind(FindingKind.ORPHANED_MATERIAL)
    with svc.ctx.meta.write():
        svc.ctx.meta.put_key(record)  # e.g. restored between the audit and the cleanup
    sink = MemorySink()
    [outcome] = delete_orphans(backend, source, scope, [orphan], sink)
    assert outcome.outcome is Outcome.SKIPPED
    assert "exists now" in outcome.reason
    assert sink.events == []
    assert [i.label for i in backend.find_keys(arn)] == [arn]


def test_delete_refuses_findings_that_are_not_orphans(kms_env):
    svc = kms_env.svc
    [arn] = create_keys(kms_env, 1)
    keygen(kms_env, arn, "--extractable")
    backend = svc.ctx.connections.get(kms_env.store_id, kms_env.cluster_id, lambda: "unused")
    scope = AuditScope("aws", ACCOUNT, REGION, kms_env.store_id, kms_env.cluster_id)
    source = StoreMetadataSource(svc.ctx.meta, kms_env.store_id)
    report = run_audit(backend, source, scope)
    outcomes = delete_orphans(backend, source, scope, report.findings, MemorySink())
    assert {o.outcome for o in outcomes} == {Outcome.SKIPPED}
    assert len(backend.find_keys(arn)) == 2


def test_find_shows_the_hsm_key_of_a_kms_key(kms_env, audit):
    [arn] = create_keys(kms_env, 1)
    result = audit(kms_env, sub=("find", arn))
    assert result.code == 0
    [key] = result.json["keys"]
    assert key["label"] == arn
    assert key["key_id"] == arn.rsplit("/", 1)[1]
    assert isinstance(key["handle"], int)
    assert (key["key_type"], key["value_len"], key["extractable"]) == ("AES", 32, False)
    assert key["violations"] == []
    by_id = audit(kms_env, sub=("find", arn.rsplit("/", 1)[1]))
    assert by_id.json == result.json
    table = audit(kms_env, "--output", "table", sub=("find", arn)).out
    assert "never_extractable" in table
    assert arn in table


def test_find_exits_1_for_missing_or_duplicated_material(kms_env, audit):
    [arn] = create_keys(kms_env, 1)
    absent = arn[:-12] + "000000000000"
    missing = audit(kms_env, sub=("find", absent))
    assert missing.code == 1
    assert missing.json["keys"] == []
    keygen(kms_env, arn, "--extractable")
    dup = audit(kms_env, sub=("find", arn))
    assert dup.code == 1
    assert len(dup.json["keys"]) == 2
    assert sum(bool(k["violations"]) for k in dup.json["keys"]) == 1


def test_find_that_matches_nothing_says_so_on_stderr(kms_env, audit):
    absent = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for key in (absent, absent.rsplit("/", 1)[1]):
        result = audit(kms_env, sub=("find", key))
        assert result.code == 1  # a KMS key without HSM key: missing material, a finding
        assert result.json == {"keys": []}
        assert result.err.count("\n") == 1
        assert result.err.startswith("nothing matched: ")
        assert absent in result.err
        assert kms_env.store_id in result.err
        assert kms_env.cluster_id in result.err


@pytest.mark.parametrize("alias", ["alias/NAME", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/NAME"])
def test_find_of_an_alias_is_a_usage_error_that_says_why(kms_env, audit, alias):
    result = audit(kms_env, sub=("find", alias))
    assert (result.code, result.out) == (2, "")
    assert result.err.count("\n") == 1
    assert "not an alias" in result.err
    assert f"hsmbridge key describe --key-id {alias}" in result.err
