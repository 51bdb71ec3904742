"""Fixtures: a live server over a fresh SoftHSM-backed environment, with or without a store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import KmsEnv
from tests.operability.live import Live, start_live


@pytest.fixture
def make_live(make_kms_env: Callable[..., KmsEnv]) -> Iterator[Callable[..., Live]]:
    """Factory: a live server; `store=True` creates and connects a store through boto3."""
    made: list[Live] = []

    def make(store: bool = True, **create_kwargs: Any) -> Live:
        live = start_live(make_kms_env(store=False), **create_kwargs)
        made.append(live)
        if store:
            live.create_store()
            live.connect()
        return live

    yield make
    for live in made:
        live.close()


@pytest.fixture
def live(make_live: Callable[..., Live]) -> Live:
    return make_live()
