"""List commands print what `aws kms` prints: without --limit/--marker the AWS CLI pages through
everything and prints the merged result key only (botocore's `build_full_result`: no `Truncated`,
no `NextMarker`); with --limit or --marker it prints the one response as the API sent it."""

from __future__ import annotations

from typing import Any

import pytest

from hsmbridge.cli import runner

PAGES = [
    {"Keys": [{"KeyId": "a"}], "NextMarker": "m1", "Truncated": True},
    {"Keys": [{"KeyId": "b"}], "NextMarker": "m2", "Truncated": True},
    {"Keys": [{"KeyId": "c"}], "Truncated": False},
]


@pytest.fixture
def api(monkeypatch) -> list[dict[str, Any]]:
    """Replaces the audited call with one that serves PAGES by marker; returns the requests."""
    seen: list[dict[str, Any]] = []

    def fake(service, sink, caller, operation, request):
        seen.append(dict(request))
        return PAGES[{None: 0, "m1": 1, "m2": 2}[request.get("Marker")]]

    monkeypatch.setattr(runner, "run_audited", fake)
    return seen


def test_all_pages_merged_without_truncated_or_marker(api) -> None:
    out = runner._all_pages(None, None, None, "ListKeys", {})  # type: ignore[arg-type]
    assert out == {"Keys": [{"KeyId": "a"}, {"KeyId": "b"}, {"KeyId": "c"}]}
    assert [r.get("Marker") for r in api] == [None, "m1", "m2"]


def test_other_request_members_kept_on_every_page(api) -> None:
    request = {"CustomKeyStoreName": "S"}
    runner._all_pages(None, None, None, "ListKeys", request)  # type: ignore[arg-type]
    assert all(r["CustomKeyStoreName"] == "S" for r in api)
    assert request == {"CustomKeyStoreName": "S"}


def test_an_empty_list_prints_the_empty_result_key(monkeypatch) -> None:
    monkeypatch.setattr(
        runner, "run_audited", lambda *a: {"CustomKeyStores": [], "Truncated": False}
    )
    out = runner._all_pages(None, None, None, "DescribeCustomKeyStores", {})  # type: ignore[arg-type]
    assert out == {"CustomKeyStores": []}


def test_the_paginated_operations_are_the_aws_cli_ones() -> None:
    from botocore.session import Session

    model = Session().get_paginator_model("kms")
    for operation, key in runner.PAGINATED.items():
        assert model.get_paginator(operation)["result_key"] == key
