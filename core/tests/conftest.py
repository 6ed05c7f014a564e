"""Fixtures shared by the core tests.

End-to-end tests run against the provider named by ``PERDURE_TEST_PROVIDER``: ``memory`` (the
default, :class:`perdure.testing.InMemoryProvider`), ``sqlite`` (a fresh file per test) or
``postgres`` (a fresh schema per test in ``PERDURE_PG_URL``). nox runs them once per provider.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from perdure import Provider, connect
from perdure.testing import InMemoryProvider

sys.path.insert(0, str(Path(__file__).parent))

PROVIDER = os.environ.get("PERDURE_TEST_PROVIDER", "memory")
PG_URL = os.environ.get("PERDURE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def make_provider(tmp_path: Path) -> Provider:
    if PROVIDER == "memory":
        return InMemoryProvider()
    if PROVIDER == "sqlite":
        return connect(f"sqlite:///{tmp_path / 'perdure.db'}")
    if PROVIDER == "postgres":
        return connect(PG_URL, schema=f"t_{uuid.uuid4().hex[:12]}")
    raise pytest.UsageError(f"unknown PERDURE_TEST_PROVIDER {PROVIDER!r} (memory, sqlite or postgres)")


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[Provider]:
    store = make_provider(tmp_path)
    await store.open()
    try:
        yield store
    finally:
        drop = getattr(store, "drop_schema", None)
        if PROVIDER == "postgres" and drop is not None:
            await drop()
        await store.close()


#: How the runtime under test runs: the orchestration cache on or off, and work handed over by
#: direct dispatch or through the queues' fetches. Results must be identical in every mode.
MODES: dict[str, dict[str, Any]] = {
    "cache": {"cache_size": 10_000, "direct_dispatch": True},
    "nocache": {"cache_size": 0, "direct_dispatch": True},
    "queued": {"cache_size": 10_000, "direct_dispatch": False},
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Runtime options of one mode (see MODES)."""
    return MODES[request.param]
