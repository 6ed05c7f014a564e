"""Fixtures: a real PostgreSQL server (pytest-postgresql's ``postgresql_noproc``), one database per
test session and one fresh schema per test.

The server comes from ``PERDURE_PG_URL`` and/or ``PERDURE_PG_HOST``/``PERDURE_PG_PORT``/
``PERDURE_PG_USER``/``PERDURE_PG_PASSWORD`` (default ``postgres@127.0.0.1:5432``). If it cannot be
reached the tests are skipped with a loud reason, except under ``CI=true``, where they fail: CI
must never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql import factories
from pytest_postgresql.executors import NoopExecutor
from pytest_postgresql.janitor import DatabaseJanitor

from perdure.provider import Provider
from perdure_postgres import PostgresProvider
from perdure_provider_tests import ProviderFactory

pytest_plugins = ["perdure_provider_tests.plugin"]

# The server: PERDURE_PG_URL (as the rest of the repository's tests use it), overridden field by
# field by PERDURE_PG_HOST/PORT/USER/PASSWORD. Its database name is ignored: we create our own.
_URL = conninfo_to_dict(os.environ.get("PERDURE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
PG_HOST = os.environ.get("PERDURE_PG_HOST", str(_URL.get("host") or "127.0.0.1"))
PG_PORT = int(os.environ.get("PERDURE_PG_PORT", str(_URL.get("port") or "5432")))
PG_USER = os.environ.get("PERDURE_PG_USER", str(_URL.get("user") or "postgres"))
PG_PASSWORD = os.environ.get("PERDURE_PG_PASSWORD", str(_URL.get("password") or ""))
IN_CI = os.environ.get("CI", "").lower() == "true"

#: One database (and one template) per test session, so concurrent sessions on one server (two
#: developers, CI next to a local run, xdist workers) never drop each other's databases.
SESSION_DB = f"perdure_pg_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

postgresql_noproc = factories.postgresql_noproc(
    host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD, dbname=SESSION_DB
)


def _server_unreachable(reason: str) -> None:
    message = (
        f"PostgreSQL is not reachable at {PG_USER}@{PG_HOST}:{PG_PORT} ({reason}). "
        "The perdure-postgres tests did NOT run. Start PostgreSQL or set PERDURE_PG_HOST/PORT/USER."
    )
    if IN_CI:
        pytest.fail(f"CI=true requires PostgreSQL: {message}", pytrace=False)
    pytest.skip(f"!!! SKIPPED: {message}")


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> NoopExecutor:
    """The running server, checked for reachability first (skip locally, fail in CI)."""
    try:
        psycopg.connect(
            host=PG_HOST,
            port=PG_PORT,
            user=PG_USER,
            password=PG_PASSWORD or None,
            dbname="postgres",
            connect_timeout=3,
        ).close()
    except psycopg.Error as exc:
        _server_unreachable(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
    executor: NoopExecutor = request.getfixturevalue("postgresql_noproc")
    return executor


@pytest.fixture(scope="session")
def pg_dsn(pg_server: NoopExecutor) -> Iterator[str]:
    """A database of our own for the session (created from the noproc template, dropped at the end)."""
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=pg_server.dbname,
        template_dbname=pg_server.template_dbname,
        maintenance_dbname=pg_server.maintenance_dbname,
    )
    with janitor:
        parts = [
            f"host={pg_server.host}",
            f"port={pg_server.port}",
            f"user={pg_server.user}",
            f"dbname={pg_server.dbname}",
        ]
        if pg_server.password:
            parts.append(f"password={pg_server.password}")
        yield " ".join(parts)


@pytest.fixture
def admin(pg_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection for inspecting tables and killing backends."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


def new_schema_name() -> str:
    """A unique schema name for one test."""
    return f"t_{uuid.uuid4().hex[:12]}"


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a test schema and everything in it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(schema))
        )


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema name, dropped after the test."""
    name = new_schema_name()
    yield name
    drop_schema(pg_dsn, name)


ProviderMaker = Callable[..., Awaitable[PostgresProvider]]


@pytest.fixture
async def make_provider(pg_dsn: str, schema: str) -> AsyncIterator[ProviderMaker]:
    """Open providers (default: on the test's schema, small pool); all closed after the test."""
    opened: list[PostgresProvider] = []

    async def make(**options: Any) -> PostgresProvider:
        options.setdefault("schema", schema)
        options.setdefault("max_pool_size", 4)
        provider = PostgresProvider(options.pop("dsn", pg_dsn), **options)
        await provider.open()
        opened.append(provider)
        return provider

    yield make
    for provider in opened:
        await provider.close()


@pytest.fixture
async def pg_provider(make_provider: ProviderMaker) -> PostgresProvider:
    """One open provider on a fresh schema (``provider`` is the conformance suite's fixture)."""
    return await make_provider()


# -- the conformance suite (perdure-provider-tests) ---------------------------------------------


class PostgresFactory(ProviderFactory):
    """Fresh, isolated providers for the conformance suite: a new schema per test, dropped after."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def create(self) -> Provider:
        schema = new_schema_name()
        provider = PostgresProvider(
            self.dsn, schema=schema, max_pool_size=4, application_name=f"perdure-{schema}"
        )
        await provider.open()
        return provider

    async def dispose(self, provider: Provider) -> None:
        await provider.close()
        assert isinstance(provider, PostgresProvider)
        drop_schema(self.dsn, provider.schema)

    def _sql(self, provider: Provider, template: str) -> psycopg.sql.Composed:
        assert isinstance(provider, PostgresProvider)
        return psycopg.sql.SQL(template).format(s=psycopg.sql.Identifier(provider.schema))

    async def _execute(
        self, provider: Provider, template: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cursor = await conn.execute(self._sql(provider, template), params)
            return await cursor.fetchall() if cursor.description else []

    async def corrupt_history(self, provider: Provider, instance_id: str) -> None:
        await self._execute(
            provider,
            "UPDATE {s}.history SET data = 'not json {{' WHERE instance_id = %(id)s AND execution_id = "
            "(SELECT current_execution_id FROM {s}.instances WHERE instance_id = %(id)s)",
            {"id": instance_id},
        )

    async def corrupt_queue_message(self, provider: Provider, instance_id: str) -> None:
        await self._execute(
            provider,
            "UPDATE {s}.orchestrator_queue SET data = '{{corrupt' WHERE instance_id = %(id)s",
            {"id": instance_id},
        )
        await self._execute(
            provider,
            "UPDATE {s}.worker_queue SET data = '{{corrupt' WHERE instance_id = %(id)s",
            {"id": instance_id},
        )

    async def attempt_count(self, provider: Provider, instance_id: str) -> int:
        rows = await self._execute(
            provider,
            "SELECT coalesce(max(a), 0) FROM ("
            " SELECT attempt_count AS a FROM {s}.orchestrator_queue WHERE instance_id = %(id)s"
            " UNION ALL SELECT attempt_count FROM {s}.worker_queue WHERE instance_id = %(id)s) x",
            {"id": instance_id},
        )
        return int(rows[0][0])

    async def drop_connections(self, provider: Provider) -> None:
        assert isinstance(provider, PostgresProvider)
        await self._execute(
            provider,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %(app)s",
            {"app": provider.application_name},
        )


@pytest.fixture
def provider_factory(pg_dsn: str) -> PostgresFactory:
    """The conformance suite's factory, on the session database."""
    return PostgresFactory(pg_dsn)
