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


@pytest.fixture(params=[10_000, 0], ids=["cache", "nocache"])
def cache_size(request: pytest.FixtureRequest) -> int:
    return int(request.param)
