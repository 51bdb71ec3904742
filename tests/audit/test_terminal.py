"""What `hsmbridge audit` does differently on a terminal, checked on a real pseudo-terminal with
`python -m hsmbridge` in its own process: a table on a terminal and JSON otherwise, the progress
bar on stderr only when stderr is a terminal, and the `delete-orphans` prompt, which destroys only
on "y" and appears only when stdin is a terminal.
"""

from __future__ import annotations

import json

import pytest

from tests.audit.conftest import create_keys, drop_metadata_row
from tests.cli.process import run_hsmbridge
from tests.harness import KmsEnv

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]  # several hsmbridge processes each
PROMPT = "Destroy 1 orphaned HSM key(s)? This cannot be undone. [y/N]"
BAR = "checking HSM objects ["


def _argv(env: KmsEnv, *sub: str) -> list[str]:
    assert env.store_id is not None
    return ["audit", *sub, "--config", str(env.config_path), "--keystore", env.store_id]


def _labels(env: KmsEnv) -> list[str]:
    backend = env.svc.ctx.connections.get(env.store_id, env.cluster_id, lambda: env.password)
    return sorted(info.label for info in backend.list_keys())


def _cleanup_events(env: KmsEnv) -> list[str]:
    """The audit log's DeleteOrphanedKeyMaterial lines (events.py owns their field names)."""
    lines = env.settings.audit_log.read_text().splitlines()
    return [line for line in lines if "DeleteOrphanedKeyMaterial" in line]


def _one_orphan(env: KmsEnv) -> str:
    _keep, orphan = create_keys(env, 2)
    drop_metadata_row(env, orphan)
    return orphan


def test_table_on_a_terminal_json_otherwise_and_the_bar_on_a_terminal_stderr(kms_env):
    orphan = _one_orphan(kms_env)

    on_tty = run_hsmbridge(*_argv(kms_env), tty={"stdout"})
    assert on_tty.code == 1, on_tty.err
    lines = on_tty.out.splitlines()
    assert lines[0].split() == ["severity", "kind", "key_id", "handle", "label", "detail"]
    [row] = lines[1:]
    assert row.split()[:3] == ["medium", "orphaned_material", orphan.rsplit("/", 1)[1]]
    assert orphan in row
    with pytest.raises(json.JSONDecodeError):
        json.loads(on_tty.out)
    assert BAR not in on_tty.err  # stderr was a pipe: no bar, only the summary
    assert "2 HSM object(s) against 1 KMS key(s)" in on_tty.err

    piped = run_hsmbridge(*_argv(kms_env), tty={"stderr"})
    assert piped.code == 1, piped.err
    [finding] = json.loads(piped.out)["findings"]
    assert (finding["kind"], finding["arn"]) == ("orphaned_material", orphan)
    assert BAR in piped.err  # stderr was a terminal
    assert "] 2/2" in piped.err
    assert "2 HSM object(s) against 1 KMS key(s)" in piped.err


def test_y_at_the_prompt_destroys_the_orphans(kms_env):
    orphan = _one_orphan(kms_env)
    assert orphan in _labels(kms_env)
    result = run_hsmbridge(
        *_argv(kms_env, "delete-orphans"), tty={"stdin"}, after="[y/N]", answer="y"
    )
    assert result.code == 0, result.err
    assert PROMPT in result.err
    doc = json.loads(result.out)
    assert doc["dryRun"] is False
    assert [(o["arn"], o["outcome"]) for o in doc["orphans"]] == [(orphan, "deleted")]
    assert "destroyed 1 of 1 orphaned HSM key(s)" in result.err
    assert orphan not in _labels(kms_env)
    [event] = _cleanup_events(kms_env)
    assert orphan in event


def test_any_other_answer_or_no_terminal_destroys_nothing(kms_env):
    orphan = _one_orphan(kms_env)
    before = _labels(kms_env)
    for answer in ("n", "", "ok"):
        result = run_hsmbridge(
            *_argv(kms_env, "delete-orphans"), tty={"stdin"}, after="[y/N]", answer=answer
        )
        assert result.code == 1, (answer, result.err)  # orphans listed, none destroyed
        assert PROMPT in result.err
        doc = json.loads(result.out)
        assert doc["dryRun"] is True
        assert [(o["arn"], o["outcome"]) for o in doc["orphans"]] == [(orphan, "would_delete")]
        assert "dry run: 1 orphan(s) listed" in result.err
    # A "y" on a pipe is no confirmation: without a terminal there is no prompt at all.
    piped = run_hsmbridge(*_argv(kms_env, "delete-orphans"), stdin_text="y\n")
    assert piped.code == 1, piped.err
    assert "[y/N]" not in piped.err
    assert json.loads(piped.out)["dryRun"] is True
    assert _labels(kms_env) == before
    assert _cleanup_events(kms_env) == []
