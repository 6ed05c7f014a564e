from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from perdure_sqlite import SqliteProvider


@pytest.fixture(params=["file", "memory"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteProvider]:
    """A fresh, opened provider: on a new temp file, or in memory."""
    path = str(tmp_path / "perdure.db") if request.param == "file" else ":memory:"
    provider = SqliteProvider(path)
    await provider.open()
    yield provider
    await provider.close()


@pytest.fixture
async def file_db(tmp_path: Path) -> AsyncIterator[SqliteProvider]:
    """A fresh, opened provider on a new temp file."""
    provider = SqliteProvider(tmp_path / "perdure.db")
    await provider.open()
    yield provider
    await provider.close()
