"""Installing the CLI (`pip install -e .`) prints no setuptools deprecation warning: the licence is
declared the PEP 639 way (an SPDX expression string), which setuptools reads from version 77."""

from __future__ import annotations

import re
import tomllib

from tests.harness import REPO


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert doc["project"]["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
    assert "License ::" not in " ".join(doc["project"].get("classifiers", []))  # PEP 639: no both
    [setuptools] = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools.replace(" ", ""))
    assert match is not None
    assert int(match.group(1)) >= 77
