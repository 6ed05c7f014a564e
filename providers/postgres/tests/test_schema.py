"""Migrations, schema checks and isolation, URLs and packaging."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import threading
import zipfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import drop_schema, new_schema_name
from pg_helpers import LEASE, start
from psycopg import sql

from perdure.provider import ProviderError
from perdure_postgres import (
    PostgresProvider,
    from_url,
    head_revision,
    migrate,
    migrations_path,
    schema_state,
    validate_schema,
)
from perdure_postgres.schema import HEAD_REVISION, revisions

TABLES = {
    "alembic_version",
    "executions",
    "history",
    "instance_locks",
    "instances",
    "orchestrator_queue",
    "worker_queue",
}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def tables_in(admin: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = admin.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
    return {r[0] for r in rows}


def schema_fingerprint(admin: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    """Columns, indexes and constraints of a schema, for comparing two migrated schemas."""
    columns = admin.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default IS NOT NULL "
        "FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
        (schema,),
    ).fetchall()
    indexes = admin.execute(
        "SELECT tablename, indexname, replace(indexdef, %s, 'S') FROM pg_indexes"
        " WHERE schemaname = %s ORDER BY 1, 2",
        (f'"{schema}"' if schema != schema.lower() else schema, schema),
    ).fetchall()
    options = admin.execute(
        "SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1",
        (schema,),
    ).fetchall()
    return [*columns, *indexes, *options]


def test_upgrade_from_an_empty_database(pg_dsn: str, schema: str, admin: psycopg.Connection[Any]) -> None:
    assert schema_state(pg_dsn, schema=schema).current is None
    migrate(pg_dsn, schema=schema)
    assert tables_in(admin, schema) == TABLES
    state = schema_state(pg_dsn, schema=schema)
    assert state.current == head_revision() and state.up_to_date
    # The version table is the schema's own, never public's.
    assert admin.execute("SELECT to_regclass('public.alembic_version')").fetchone() == (None,)


def test_migrating_again_is_a_no_op(pg_dsn: str, schema: str, admin: psycopg.Connection[Any]) -> None:
    migrate(pg_dsn, schema=schema)
    before = schema_fingerprint(admin, schema)
    migrate(pg_dsn, schema=schema)
    migrate(pg_dsn, schema=schema)
    assert schema_fingerprint(admin, schema) == before
    assert admin.execute(
        sql.SQL("SELECT count(*) FROM {}.alembic_version").format(sql.Identifier(schema))
    ).fetchone() == (1,)


def test_concurrent_migrators_serialise(pg_dsn: str, schema: str, admin: psycopg.Connection[Any]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait(10)
            migrate(pg_dsn, schema=schema)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert tables_in(admin, schema) == TABLES
    assert schema_state(pg_dsn, schema=schema).up_to_date


@pytest.mark.parametrize("revision", revisions()[:-1])
def test_upgrade_from_every_earlier_revision(
    pg_dsn: str, schema: str, admin: psycopg.Connection[Any], revision: str
) -> None:
    migrate(pg_dsn, schema=schema, revision=revision)
    assert schema_state(pg_dsn, schema=schema).current == revision
    migrate(pg_dsn, schema=schema)
    reference = new_schema_name()
    try:
        migrate(pg_dsn, schema=reference)
        assert schema_fingerprint(admin, schema) == schema_fingerprint(admin, reference)
    finally:
        drop_schema(pg_dsn, reference)


def test_downgrade_to_base_and_back(pg_dsn: str, schema: str, admin: psycopg.Connection[Any]) -> None:
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from perdure_postgres.schema import _alembic_config

    migrate(pg_dsn, schema=schema)
    fingerprint = schema_fingerprint(admin, schema)
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(pg_dsn), poolclass=NullPool
    )
    with engine.connect() as conn, conn.begin():
        cfg = _alembic_config(schema)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    engine.dispose()
    assert tables_in(admin, schema) == {"alembic_version"}
    migrate(pg_dsn, schema=schema)
    assert schema_fingerprint(admin, schema) == fingerprint


def test_every_revision_is_reachable_from_empty() -> None:
    assert revisions()[-1] == head_revision() == HEAD_REVISION
    assert revisions()[0] == "0001"


async def test_open_migrates_by_default(pg_dsn: str, schema: str, admin: psycopg.Connection[Any]) -> None:
    provider = PostgresProvider(pg_dsn, schema=schema)
    await provider.open()
    await provider.close()
    assert tables_in(admin, schema) == TABLES


async def test_open_without_migrate_refuses_an_unmigrated_schema(pg_dsn: str, schema: str) -> None:
    provider = PostgresProvider(pg_dsn, schema=schema, migrate=False)
    with pytest.raises(ProviderError) as raised:
        await provider.open()
    assert not raised.value.retryable
    assert "run the migrations" in raised.value.message and schema in raised.value.message
    await asyncio.to_thread(migrate, pg_dsn, schema=schema)
    provider = PostgresProvider(pg_dsn, schema=schema, migrate=False)
    await provider.open()
    await provider.enqueue_orchestrator_messages([start("a")])
    await provider.close()


@pytest.mark.parametrize("auto_migrate", [False, True])
async def test_a_schema_from_a_newer_release_is_refused(
    pg_dsn: str, schema: str, admin: psycopg.Connection[Any], auto_migrate: bool
) -> None:
    migrate(pg_dsn, schema=schema)
    admin.execute(
        sql.SQL("UPDATE {}.alembic_version SET version_num = '9999'").format(sql.Identifier(schema))
    )
    provider = PostgresProvider(pg_dsn, schema=schema, migrate=auto_migrate)
    with pytest.raises(ProviderError) as raised:
        await provider.open()
    assert "newer release" in raised.value.message


async def test_two_schemas_in_one_database_are_isolated(make_provider: Any, pg_dsn: str) -> None:
    other = new_schema_name()
    try:
        a = await make_provider()
        b = await make_provider(schema=other)
        await a.enqueue_orchestrator_messages([start("same-id")])
        await b.wait_for_work("orchestrator", 0)
        started = asyncio.get_running_loop().time()
        await b.wait_for_work("orchestrator", 0.3)  # a's NOTIFY is on another channel
        assert asyncio.get_running_loop().time() - started >= 0.25
        assert await b.fetch_orchestration_items(5, LEASE) == []
        assert await b.get_instance("same-id") is None
        await b.enqueue_orchestrator_messages([start("same-id")])
        [item_a] = await a.fetch_orchestration_items(5, LEASE)
        [item_b] = await b.fetch_orchestration_items(5, LEASE)
        assert item_a.lock_token != item_b.lock_token
        with pytest.raises(ProviderError):
            await b.renew_orchestration_lock(item_a.lock_token, LEASE)
    finally:
        drop_schema(pg_dsn, other)


async def test_a_mixed_case_schema_is_quoted_everywhere(
    make_provider: Any, pg_dsn: str, admin: psycopg.Connection[Any]
) -> None:
    schema = "Mixed_" + new_schema_name()
    try:
        provider = await make_provider(schema=schema)
        await provider.enqueue_orchestrator_messages([start("a")])
        assert len(await provider.fetch_orchestration_items(1, LEASE)) == 1
        assert tables_in(admin, schema) == TABLES
        assert tables_in(admin, schema.lower()) == set()
    finally:
        drop_schema(pg_dsn, schema)


@pytest.mark.parametrize(
    "name", ["", "1abc", "a-b", 'a"b', "a b", "x" * 64, "public", "pg_temp", "information_schema", "a;drop"]
)
def test_invalid_schema_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        validate_schema(name)
    with pytest.raises(ValueError, match="schema"):
        PostgresProvider("host=x", schema=name)


def test_from_url_separates_provider_options_from_libpq_ones() -> None:
    provider = from_url(
        "postgresql://u:p@db.example:5433/app?schema=app_1&max_pool_size=7&min_pool_size=2&sslmode=require"
        "&statement_timeout=none&migrate=false&listen=0&connect_timeout=2.5&prepare_threshold=none"
    )
    assert provider.schema == "app_1"
    assert (provider.min_pool_size, provider.max_pool_size) == (2, 7)
    assert provider.statement_timeout is None and provider.auto_migrate is False and provider.listen is False
    assert provider.connect_timeout == 2.5 and provider.prepare_threshold is None
    assert provider.dsn == "postgresql://u:p@db.example:5433/app?sslmode=require"


def test_from_url_keyword_options_win_and_schemes_are_checked() -> None:
    assert from_url("postgres://h/db?schema=a", schema="b").schema == "b"
    assert from_url("postgresql+psycopg://h/db").schema == "perdure"
    with pytest.raises(ValueError, match="PostgreSQL"):
        from_url("sqlite:///x.db")
    with pytest.raises(ValueError, match="max_pool_size"):
        from_url("postgresql://h/db?max_pool_size=lots")


def test_entry_points_are_registered() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="perdure.providers")}
    assert found.get("postgresql") == "perdure_postgres:from_url"
    assert found.get("postgres") == "perdure_postgres:from_url"


def test_migrations_are_found() -> None:
    path = migrations_path()
    assert (path / "env.py").is_file()
    assert (path / "versions").is_dir()


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_migrations(tmp_path: Path) -> None:
    # Without build isolation when hatchling is at hand (fast, offline); else pip fetches it.
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *isolation,
            "-q",
            "-w",
            str(tmp_path),
            str(PACKAGE_ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("perdure_postgres-0.1.0-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "perdure_postgres/migrations/env.py" in names
    assert "perdure_postgres/migrations/script.py.mako" in names
    assert "perdure_postgres/migrations/versions/0001_initial_schema.py" in names
    assert "perdure_postgres/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # Installed from the wheel, the package finds its own copy.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import perdure_postgres as p; print(p.__file__, p.migrations_path(), p.head_revision())",
        ],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    module_file, path, head = probe.stdout.split()
    assert module_file.startswith(str(target))
    assert path == str(target / "perdure_postgres" / "migrations")
    assert head == head_revision()
