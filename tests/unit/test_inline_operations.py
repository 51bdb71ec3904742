"""Which requests the HTTP edge tries on its event loop first (`hsmbridge.nowait`)."""

from __future__ import annotations

from pathlib import Path

from hsmbridge.config import load_settings
from hsmbridge.http.compose import _inline_operations
from hsmbridge.protocol.operations import INLINE_OPERATIONS

SERVICE = '[service]\nregion = "us-east-1"\naccount_id = "111122223333"\n'
INVENTORY = '[inventory]\nprovider = "static"\npath = "clusters.json"\n'


def _settings(tmp_path: Path, *profiles: str, extra: str = ""):
    clusters = "".join(
        f'[[clusters]]\ncluster_id = "cluster-{i:011d}"\nprofile = "{profile}"\n'
        for i, profile in enumerate(profiles)
    )
    path = tmp_path / "hsmbridge.toml"
    path.write_text(SERVICE + extra + INVENTORY + clusters)
    return load_settings(path)


def test_a_local_library_hsm_gets_inline_attempts(tmp_path: Path) -> None:
    assert _inline_operations(_settings(tmp_path, "softhsm2")) == INLINE_OPERATIONS
    assert _inline_operations(_settings(tmp_path, "cloudhsm", "softhsm2")) == INLINE_OPERATIONS


def test_no_attempt_when_no_cluster_may_be_called_inline(tmp_path: Path) -> None:
    # CloudHSM's calls cross the network: every attempt would be refused and run again.
    assert _inline_operations(_settings(tmp_path, "cloudhsm")) == frozenset()
    assert _inline_operations(_settings(tmp_path)) == frozenset()


def test_switched_off(tmp_path: Path) -> None:
    off = _settings(tmp_path, "softhsm2", extra="inline_hsm_calls = false\n")
    assert _inline_operations(off) == frozenset()
