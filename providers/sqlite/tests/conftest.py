from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from perdure.provider import Provider
from perdure_provider_tests import ProviderFactory
from perdure_sqlite import SqliteProvider

pytest_plugins = ["perdure_provider_tests.plugin"]


class SqliteFactory(ProviderFactory):
    """Fresh providers for the conformance suite, each on a new file in its own temp directory."""

    def __init__(self) -> None:
        self._dirs: dict[int, str] = {}

    async def create(self) -> Provider:
        directory = tempfile.mkdtemp(prefix="perdure-sqlite-")
        provider = SqliteProvider(Path(directory) / "perdure.db")
        await provider.open()
        self._dirs[id(provider)] = directory
        return provider

    async def dispose(self, provider: Provider) -> None:
        await provider.close()
        directory = self._dirs.pop(id(provider), None)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    async def corrupt_history(self, provider: Provider, instance_id: str) -> None:
        assert isinstance(provider, SqliteProvider)
        await provider._execute(
            "UPDATE history SET payload = '{corrupt' WHERE instance_id = :id"
            " AND execution_id = (SELECT execution_id FROM instances WHERE instance_id = :id)",
            {"id": instance_id},
        )

    async def corrupt_queue_message(self, provider: Provider, instance_id: str) -> None:
        assert isinstance(provider, SqliteProvider)
        for table in ("orchestrator_queue", "worker_queue"):
            await provider._execute(
                f"UPDATE {table} SET payload = '{{corrupt' WHERE instance_id = ?", (instance_id,)
            )

    async def attempt_count(self, provider: Provider, instance_id: str) -> int:
        assert isinstance(provider, SqliteProvider)
        [(count,)] = await provider._execute(
            "SELECT max("
            " coalesce((SELECT max(attempt_count) FROM orchestrator_queue WHERE instance_id = :id), 0),"
            " coalesce((SELECT max(attempt_count) FROM worker_queue WHERE instance_id = :id), 0))",
            {"id": instance_id},
        )
        return int(count)


@pytest.fixture
def provider_factory() -> SqliteFactory:
    return SqliteFactory()


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
