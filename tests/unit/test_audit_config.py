"""The `[audit]` table: optional, every key bounded, and what the server's audit sink opens with.

A bad value is a ConfigError naming the file, the table and the key, like every other setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmbridge import bootstrap
from hsmbridge.config import AuditSettings, load_settings
from hsmbridge.errors import ConfigError

CONFIG = (
    '[service]\nregion = "eu-west-2"\naccount_id = "111122223333"\n'
    '[paths]\ndata_dir = "data"\n'
    '[inventory]\nprovider = "static"\npath = "clusters.json"\n'
)


def write(tmp_path: Path, audit: str | None) -> Path:
    path = tmp_path / "hsmbridge.toml"
    path.write_text(CONFIG + ("" if audit is None else "[audit]\n" + audit))
    return path


def test_without_an_audit_table_the_defaults_apply(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, None))
    assert settings.audit == AuditSettings()
    assert settings.audit == AuditSettings(
        max_bytes=100 * 1024 * 1024, backups=5, max_entry_bytes=16 * 1024, unauthenticated_per_s=20
    )


def test_audit_table_is_read(tmp_path: Path) -> None:
    text = (
        "max_bytes = 1_048_576\nbackups = 100\nmax_entry_bytes = 1024\nunauthenticated_per_s = 2\n"
    )
    audit = load_settings(write(tmp_path, text)).audit
    assert audit == AuditSettings(1 << 20, 100, 1024, 2.0)
    assert isinstance(audit.unauthenticated_per_s, float)


# (table body, words the error must contain besides the file's path and "[audit]")
BAD_AUDIT = [
    ("max_bytes = 1048575\n", ["'max_bytes'", "1 MiB", "1048575"]),
    ('max_bytes = "100M"\n', ["'max_bytes'", "int"]),
    ("backups = 0\n", ["'backups'", "1-100"]),
    ("backups = 101\n", ["'backups'", "1-100"]),
    ("backups = true\n", ["'backups'", "int"]),
    ("max_entry_bytes = 1023\n", ["'max_entry_bytes'", "1 KiB"]),
    ("max_entry_bytes = 1048577\n", ["'max_entry_bytes'", "1 MiB"]),
    ("unauthenticated_per_s = 0\n", ["'unauthenticated_per_s'", "> 0"]),
    ("unauthenticated_per_s = -1.5\n", ["'unauthenticated_per_s'", "> 0"]),
    ("unauthenticated_per_s = nan\n", ["'unauthenticated_per_s'", "> 0"]),
    ("unauthenticated_per_s = inf\n", ["'unauthenticated_per_s'", "> 0"]),
    ('unauthenticated_per_s = "20"\n', ["'unauthenticated_per_s'", "float"]),
    ("max_byte = 1048576\n", ["unknown", "'max_byte'", "max_bytes"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_AUDIT)
def test_bad_audit_setting_names_file_table_and_key(
    tmp_path: Path, text: str, words: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    for word in [str(path.resolve()), "[audit]", *words]:
        assert word in message, message


def test_audit_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "hsmbridge.toml"
    path.write_text('audit = "off"\n' + CONFIG)
    with pytest.raises(ConfigError, match=r"'audit' must be a dict"):
        load_settings(path)


def test_the_servers_sink_is_opened_with_the_audit_settings(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "max_bytes = 2097152\nbackups = 3\n"))
    sink = bootstrap.open_buffered_audit_log(settings)
    try:
        assert sink.limits == AuditSettings(max_bytes=2 << 20, backups=3)
        assert sink.path == settings.audit_log
    finally:
        sink.close()
