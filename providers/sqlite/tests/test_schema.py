"""Migrations: applied on open, skipped on request, runnable ahead of time, shipped in the wheel."""

from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlite_support import LOCK, start

from perdure.provider import ProviderError
from perdure_sqlite import SCHEMA_REVISION, SqliteProvider, migrate, migrations_path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

EXPECTED_TABLES = {
    "alembic_version",
    "executions",
    "history",
    "instance_locks",
    "instances",
    "orchestrator_queue",
    "worker_queue",
}


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    connection.close()
    return {name for (name,) in rows}


def _alembic_config(path: Path) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    return config


def test_schema_revision_is_the_alembic_head() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_path()))
    assert script.get_heads() == [SCHEMA_REVISION]


async def test_open_applies_the_migrations(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SqliteProvider(path) as db:
        assert await db._execute("SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]
    assert _tables(path) == EXPECTED_TABLES


async def test_migrate_false_refuses_a_database_without_schema(tmp_path: Path) -> None:
    db = SqliteProvider(tmp_path / "empty.db", migrate=False)
    with pytest.raises(ProviderError, match=r"no perdure schema.*migrate") as info:
        await db.open()
    assert not info.value.retryable
    await db.close()


async def test_migrate_ahead_of_time_then_open_without_migrating(tmp_path: Path) -> None:
    path = tmp_path / "deployed.db"
    assert migrate(path) == SCHEMA_REVISION
    assert migrate(path) == SCHEMA_REVISION  # idempotent
    async with SqliteProvider(path, migrate=False) as db:
        await db.enqueue_orchestrator_messages([start("a")])
        assert len(await db.fetch_orchestration_items(1, LOCK)) == 1


async def test_an_old_schema_is_upgraded_or_refused(tmp_path: Path) -> None:
    from alembic import command

    path = tmp_path / "old.db"
    migrate(path)
    command.downgrade(_alembic_config(path), "base")  # type: ignore[arg-type]
    assert _tables(path) == {"alembic_version"}
    with pytest.raises(ProviderError, match="migrate"):
        await SqliteProvider(path, migrate=False).open()
    async with SqliteProvider(path) as db:
        assert await db.fetch_orchestration_items(1, LOCK) == []
    assert _tables(path) == EXPECTED_TABLES


async def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    migrate(path)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    for provider in (SqliteProvider(path), SqliteProvider(path, migrate=False)):
        with pytest.raises(ProviderError, match="newer") as info:
            await provider.open()
        assert not info.value.retryable


def test_alembic_cli_configuration_upgrades_from_empty(tmp_path: Path) -> None:
    from alembic import command

    path = tmp_path / "cli.db"
    command.upgrade(_alembic_config(path), "head")  # type: ignore[arg-type]
    assert _tables(path) == EXPECTED_TABLES
    command.downgrade(_alembic_config(path), "base")  # type: ignore[arg-type]
    command.upgrade(_alembic_config(path), "head")  # type: ignore[arg-type]
    assert _tables(path) == EXPECTED_TABLES


def test_every_revision_upgrades_to_head_and_back(tmp_path: Path) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    revisions = [r.revision for r in ScriptDirectory(str(migrations_path())).walk_revisions()]
    for revision in revisions:
        path = tmp_path / f"from-{revision}.db"
        config = _alembic_config(path)
        command.upgrade(config, revision)  # type: ignore[arg-type]
        assert migrate(path) == SCHEMA_REVISION
        assert _tables(path) == EXPECTED_TABLES
        command.downgrade(config, "base")  # type: ignore[arg-type]
        assert _tables(path) == {"alembic_version"}


def test_concurrent_migrations_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    with ThreadPoolExecutor(6) as pool:
        revisions = list(pool.map(lambda _: migrate(path), range(6)))
    assert revisions == [SCHEMA_REVISION] * 6
    assert _tables(path) == EXPECTED_TABLES


def test_concurrent_migrations_from_several_processes_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "race.db"
    script = "import sys; from perdure_sqlite import migrate; print(migrate(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    assert outputs == [SCHEMA_REVISION] * 4
    assert _tables(path) == EXPECTED_TABLES


async def test_memory_databases_are_migrated_too() -> None:
    async with SqliteProvider(":memory:") as db:
        assert await db._execute("SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]


def test_migrations_are_found() -> None:
    assert (migrations_path() / "env.py").is_file()
    assert (migrations_path() / "versions").is_dir()


def _migration_files() -> set[str]:
    root = migrations_path()
    files = [root / "env.py", root / "script.py.mako", root / "alembic.ini", *root.glob("versions/*.py")]
    return {path.relative_to(root).as_posix() for path in files}


def _wheel_migrations(wheel: Path) -> set[str]:
    prefix = "perdure_sqlite/migrations/"
    names = zipfile.ZipFile(wheel).namelist()
    assert "perdure_sqlite/py.typed" in names
    entry_points = zipfile.ZipFile(wheel).read("perdure_sqlite-0.1.0.dist-info/entry_points.txt").decode()
    assert "[perdure.providers]" in entry_points
    assert "sqlite = perdure_sqlite:from_url" in entry_points
    return {name.removeprefix(prefix) for name in names if name.startswith(prefix)}


NEEDS_HATCHLING = pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None, reason="building the wheel needs hatchling"
)


@NEEDS_HATCHLING
def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    out = tmp_path / "wheelhouse"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    subprocess.run([*command, str(PACKAGE_ROOT)], check=True, timeout=300)
    [wheel] = list(out.glob("perdure_sqlite-0.1.0-*.whl"))
    assert _wheel_migrations(wheel) == _migration_files()  # exactly these: no __pycache__, no strays


@NEEDS_HATCHLING
def test_a_wheel_built_from_the_sdist_ships_the_migrations(tmp_path: Path) -> None:
    from hatchling.builders.sdist import SdistBuilder
    from hatchling.builders.wheel import WheelBuilder

    [sdist] = list(SdistBuilder(str(PACKAGE_ROOT)).build(directory=str(tmp_path / "sdist")))
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    [unpacked] = list((tmp_path / "unpacked").iterdir())
    [wheel] = list(WheelBuilder(str(unpacked)).build(directory=str(tmp_path / "wheel")))
    assert _wheel_migrations(Path(wheel)) == _migration_files()
