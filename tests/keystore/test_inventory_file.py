"""The static inventory as a document to change (`InventoryFile`) and the delayed HSM transitions
every reader resolves against its clock (`HsmbridgeTransitionAt`)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hsmbridge.config import InventorySettings, load_settings
from hsmbridge.errors import ConfigError
from hsmbridge.keystore.inventory import (
    TRANSITION_AT,
    StaticInventory,
    effective_hsm_state,
    parse_clusters_document,
)
from hsmbridge.keystore.inventory_file import InventoryFile
from hsmbridge.keystore.quorum import Operation, check

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _hsms(doc: dict[str, Any]) -> list[dict[str, Any]]:
    hsms: list[dict[str, Any]] = doc["Clusters"][0]["Hsms"]
    return hsms


def _with_transitions(demo_document: dict[str, Any]) -> dict[str, Any]:
    """The demo: HSM 0 being created until NOW+10, HSM 1 being deleted until NOW+20."""
    doc = json.loads(json.dumps(demo_document))
    first, second = _hsms(doc)
    first.update(State="CREATE_IN_PROGRESS", **{TRANSITION_AT: NOW + 10})
    second.update(State="DELETE_IN_PROGRESS", **{TRANSITION_AT: NOW + 20})
    return doc


# --- effective states --------------------------------------------------------------------------


def test_effective_state_follows_the_clock() -> None:
    creating = {"State": "CREATE_IN_PROGRESS", TRANSITION_AT: NOW}
    deleting = {"State": "DELETE_IN_PROGRESS", TRANSITION_AT: NOW}
    assert effective_hsm_state(creating, NOW - 0.5) == "CREATE_IN_PROGRESS"
    assert effective_hsm_state(creating, NOW) == "ACTIVE"
    assert effective_hsm_state(deleting, NOW - 0.5) == "DELETE_IN_PROGRESS"
    assert effective_hsm_state(deleting, NOW) is None
    assert effective_hsm_state(creating, None) == "CREATE_IN_PROGRESS"  # no clock: as written
    # Only the two transitional states move; a DEGRADED HSM stays so whatever the member says.
    assert effective_hsm_state({"State": "DEGRADED", TRANSITION_AT: 0}, NOW) == "DEGRADED"
    assert effective_hsm_state({"State": "DELETE_IN_PROGRESS"}, NOW) == "DELETE_IN_PROGRESS"


def test_static_inventory_resolves_transitions_with_its_clock(
    inventory_file, demo_document, demo_cluster_id
) -> None:
    clock = Clock()
    inventory = StaticInventory(inventory_file(_with_transitions(demo_document)), clock)
    info = inventory.describe(demo_cluster_id)
    assert [h.state for h in info.hsms] == ["CREATE_IN_PROGRESS", "DELETE_IN_PROGRESS"]
    assert info.active_hsms == ()
    clock.now = NOW + 10
    info = inventory.describe(demo_cluster_id)
    assert [h.state for h in info.hsms] == ["ACTIVE", "DELETE_IN_PROGRESS"]
    clock.now = NOW + 20
    info = inventory.describe(demo_cluster_id)
    assert [(h.availability_zone, h.state) for h in info.hsms] == [("us-east-1a", "ACTIVE")]
    assert not check(Operation.CREATE_KEY, info).ok  # one AZ left


def test_parser_ignores_the_private_member_but_checks_its_type(demo_document) -> None:
    doc = _with_transitions(demo_document)
    clusters = parse_clusters_document(doc)  # no clock: states as written
    assert [h.state for h in clusters[0].hsms] == ["CREATE_IN_PROGRESS", "DELETE_IN_PROGRESS"]
    assert not any(TRANSITION_AT.lower() in repr(h).lower() for h in clusters[0].hsms)
    _hsms(doc)[0][TRANSITION_AT] = "soon"
    with pytest.raises(Exception, match=rf"Hsms\[0\]\.{TRANSITION_AT}"):
        parse_clusters_document(doc, NOW)


def test_static_inventory_names_a_bad_transition_member(inventory_file, demo_document) -> None:
    doc = _with_transitions(demo_document)
    _hsms(doc)[1][TRANSITION_AT] = True
    inventory = StaticInventory(inventory_file(doc), Clock())
    with pytest.raises(ConfigError, match=rf"Hsms\[1\]\.{TRANSITION_AT}"):
        inventory.clusters()


# --- InventoryFile -----------------------------------------------------------------------------


def test_read_applies_due_transitions_without_writing(inventory_file, demo_document) -> None:
    path = inventory_file(_with_transitions(demo_document))
    before = path.read_bytes()
    clock = Clock(NOW + 15)
    doc = InventoryFile(path, clock=clock).read()
    first, second = _hsms(doc)
    assert first["State"] == "ACTIVE"
    assert TRANSITION_AT not in first
    assert first["StateMessage"] == "HSM created."
    assert second["State"] == "DELETE_IN_PROGRESS"
    assert second[TRANSITION_AT] == NOW + 20
    assert path.read_bytes() == before  # reading never writes
    clock.now = NOW + 20
    assert [h["State"] for h in _hsms(InventoryFile(path, clock=clock).read())] == ["ACTIVE"]


def test_update_writes_atomically_and_returns_the_result(inventory_file, demo_document) -> None:
    path = inventory_file(demo_document)
    path.chmod(0o640)
    inode = path.stat().st_ino
    file = InventoryFile(path, clock=Clock())

    def add_tag(doc: dict[str, Any]) -> str:
        doc["Clusters"][0]["TagList"].append({"Key": "team", "Value": "crypto"})
        return "done"

    assert file.update(add_tag) == "done"
    assert json.loads(path.read_text())["Clusters"][0]["TagList"] == [
        {"Key": "team", "Value": "crypto"}
    ]
    assert path.stat().st_ino != inode  # replaced, not rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # the document keeps its mode
    assert file.lock_path == path.with_name("clusters.json.lock")
    assert file.lock_path.exists()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_update_that_raises_or_breaks_the_document_writes_nothing(
    inventory_file, demo_document
) -> None:
    path = inventory_file(demo_document)
    before = path.read_bytes()
    file = InventoryFile(path, clock=Clock())

    def fail(doc: dict[str, Any]) -> None:
        doc["Clusters"] = []
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        file.update(fail)
    with pytest.raises(ConfigError, match=r"HsmId"):
        file.update(lambda doc: _hsms(doc)[0].pop("HsmId"))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_update_without_change_does_not_rewrite(inventory_file, demo_document) -> None:
    path = inventory_file(demo_document)
    inode = path.stat().st_ino
    InventoryFile(path, clock=Clock()).update(lambda doc: None)
    assert path.stat().st_ino == inode


def test_update_stores_due_transitions_resolved(inventory_file, demo_document) -> None:
    path = inventory_file(_with_transitions(demo_document))
    InventoryFile(path, clock=Clock(NOW + 30)).update(lambda doc: None)
    stored = json.loads(path.read_text())
    assert [(h["State"], TRANSITION_AT in h) for h in _hsms(stored)] == [("ACTIVE", False)]


def test_unreadable_document_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "clusters.json"
    path.write_text("{not json")
    file = InventoryFile(path)
    with pytest.raises(ConfigError, match="not valid JSON"):
        file.read()
    with pytest.raises(ConfigError, match="not valid JSON"):
        file.update(lambda doc: None)
    with pytest.raises(ConfigError, match="cannot be read"):
        InventoryFile(tmp_path / "absent.json").read()


def test_update_waits_for_the_lock(inventory_file, demo_document) -> None:
    path = inventory_file(demo_document)
    file = InventoryFile(path, clock=Clock())
    holder = os.open(file.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another writer, mid-update
    done = threading.Event()

    def tag(doc: dict[str, Any]) -> None:
        doc["Clusters"][0]["TagList"] = [{"Key": "k", "Value": "v"}]

    worker = threading.Thread(target=lambda: (file.update(tag), done.set()))
    worker.start()
    try:
        assert not done.wait(0.3)  # blocked behind the lock
        assert json.loads(path.read_text())["Clusters"][0]["TagList"] == []
    finally:
        os.close(holder)  # releases the lock
    worker.join(10)
    assert done.is_set()
    assert json.loads(path.read_text())["Clusters"][0]["TagList"] == [{"Key": "k", "Value": "v"}]


def _add_hsms(path: str, worker: int, count: int, start: Any) -> None:
    """A separate process appending `count` HSMs, one locked update each."""
    file = InventoryFile(Path(path))
    start.wait()
    for i in range(count):

        def add(doc: dict[str, Any], i: int = i) -> None:
            hsms = doc["Clusters"][0]["Hsms"]
            template = dict(hsms[0])
            template.update(HsmId=f"hsm-w{worker}n{i}", State="ACTIVE")
            hsms.append(template)

        file.update(add)


def test_concurrent_writers_in_several_processes_lose_nothing(
    inventory_file, demo_document, demo_cluster_id
) -> None:
    path = inventory_file(demo_document)
    workers, each = 4, 15
    mp = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the file
    start = mp.Event()
    procs = [mp.Process(target=_add_hsms, args=(str(path), w, each, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    reader = StaticInventory(path)
    start.set()
    deadline = time.monotonic() + 120
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        reader.describe(demo_cluster_id)  # readers take no lock and never see a torn file
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        assert proc.exitcode == 0
    ids = [h["HsmId"] for h in _hsms(json.loads(path.read_text()))]
    added = {f"hsm-w{w}n{i}" for w in range(workers) for i in range(each)}
    assert len(ids) == 2 + workers * each
    assert added <= set(ids)


# --- [inventory] hsm_transition_delay_s ---------------------------------------------------------

_CONFIG = '[service]\nregion = "us-east-1"\naccount_id = "111122223333"\n'


def _settings_with(tmp_path: Path, extra: str) -> InventorySettings:
    path = tmp_path / "hsmbridge.toml"
    path.write_text(_CONFIG + '[inventory]\nprovider = "static"\npath = "clusters.json"\n' + extra)
    return load_settings(path).inventory


def test_transition_delay_setting(tmp_path: Path) -> None:
    assert _settings_with(tmp_path, "").hsm_transition_delay_s == 10.0
    assert _settings_with(tmp_path, "hsm_transition_delay_s = 0\n").hsm_transition_delay_s == 0.0
    assert _settings_with(tmp_path, "hsm_transition_delay_s = 2.5\n").hsm_transition_delay_s == 2.5
    for bad in ("-1", "nan", "inf", '"10"', "true"):
        with pytest.raises(ConfigError, match="hsm_transition_delay_s"):
            _settings_with(tmp_path, f"hsm_transition_delay_s = {bad}\n")
