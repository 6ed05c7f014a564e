"""Dropped connections, timeouts and error classification."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest
from pg_helpers import LEASE, eventually, start, table
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import PoolClosed, PoolTimeout

from perdure.provider import ProviderError
from perdure_postgres import PostgresProvider
from perdure_postgres._errors import is_connection_error, to_provider_error


def backends(admin: psycopg.Connection[Any], application_name: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
        (application_name,),
    ).fetchall()
    return [r[0] for r in rows]


class TableLock:
    """Hold ACCESS EXCLUSIVE on a table in another connection so provider statements block on it."""

    def __init__(self, dsn: str, table_sql: sql.Composed) -> None:
        self.dsn = dsn
        self.table_sql = table_sql
        self.locked = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(self.table_sql))
            self.locked.set()
            self.release.wait(30)

    async def __aenter__(self) -> TableLock:
        self.thread.start()
        await asyncio.to_thread(self.locked.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await asyncio.to_thread(self.thread.join, 10)


async def test_connection_killed_mid_call_is_retryable_and_the_next_call_succeeds(
    make_provider: Any, admin: psycopg.Connection[Any], pg_dsn: str
) -> None:
    provider = await make_provider(application_name="perdure-midcall")
    async with TableLock(pg_dsn, table(provider, "orchestrator_queue")):
        call = asyncio.ensure_future(provider.enqueue_orchestrator_messages([start("a")]))

        def blocked_pid() -> int | None:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = 'perdure-midcall' AND wait_event_type = 'Lock'"
            ).fetchone()
            return row[0] if row else None

        await eventually(lambda: blocked_pid() is not None)
        admin.execute("SELECT pg_terminate_backend(%s)", (blocked_pid(),))
        with pytest.raises(ProviderError) as raised:
            await asyncio.wait_for(call, 10)
        assert raised.value.retryable
    await provider.enqueue_orchestrator_messages([start("b")])
    [item] = await provider.fetch_orchestration_items(5, LEASE)
    assert item.instance_id == "b"


async def test_idle_connections_killed_are_replaced_before_use(
    make_provider: Any, admin: psycopg.Connection[Any]
) -> None:
    provider = await make_provider(
        application_name="perdure-idlekill", min_pool_size=2, max_pool_size=2, listen=False
    )
    await provider.enqueue_orchestrator_messages([start("a")])
    pids = backends(admin, "perdure-idlekill")
    assert pids
    for pid in pids:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await eventually(lambda: not set(pids) & set(backends(admin, "perdure-idlekill")))
    # No error at all: the pool's check sees the dead sockets and replaces them.
    for _ in range(5):
        assert await provider.get_instance("nope") is None
    await provider.enqueue_orchestrator_messages([start("b")])
    assert len(await provider.fetch_orchestration_items(5, LEASE)) == 2


async def test_every_connection_killed_recovers(make_provider: Any, admin: psycopg.Connection[Any]) -> None:
    """Like a server restart: pool and listener connections all die; calls recover, the listener too."""
    provider = await make_provider(application_name="perdure-restart", min_pool_size=2)
    listener = provider.listener
    assert listener is not None
    for pid in backends(admin, "perdure-restart"):
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    outcomes: list[bool | None] = []
    for k in range(3):
        try:
            await provider.enqueue_orchestrator_messages([start(f"i{k}")])
            outcomes.append(None)
        except ProviderError as exc:
            outcomes.append(exc.retryable)
    assert False not in outcomes
    assert outcomes[-1] is None
    await eventually(lambda: listener.connects >= 2 and listener.connected, timeout=10)


async def test_statement_timeout_is_set_on_pooled_connections(make_provider: Any) -> None:
    provider = await make_provider(statement_timeout=1.5)
    assert provider._pool is not None
    async with provider._pool.connection() as conn:
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
    assert row == ("1500ms",)


async def test_statement_timeout_is_a_retryable_error(make_provider: Any, pg_dsn: str) -> None:
    provider = await make_provider(statement_timeout=0.3)
    async with TableLock(pg_dsn, table(provider, "orchestrator_queue")):
        with pytest.raises(ProviderError) as raised:
            await provider.enqueue_orchestrator_messages([start("a")])
    assert raised.value.retryable
    assert "statement timeout" in raised.value.message
    await provider.enqueue_orchestrator_messages([start("a")])


async def test_deadlocks_are_retried_inside_the_provider(pg_provider: PostgresProvider) -> None:
    attempts = 0

    async def body(conn: Any) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise pg_errors.DeadlockDetected("deadlock detected")
        return "done"

    assert await pg_provider._run("test", body) == "done"
    assert attempts == 3


async def test_persistent_conflicts_end_as_retryable_errors(pg_provider: PostgresProvider) -> None:
    async def body(conn: Any) -> None:
        raise pg_errors.SerializationFailure("could not serialize access")

    with pytest.raises(ProviderError) as raised:
        await pg_provider._run("test", body)
    assert raised.value.retryable


async def test_a_real_deadlock_between_two_batches_is_absorbed(make_provider: Any, pg_dsn: str) -> None:
    """Two transactions locking two lock rows in opposite orders: PostgreSQL kills one (40P01),
    the provider retries it, and the caller sees success."""
    provider = await make_provider()
    await provider.enqueue_orchestrator_messages([start("a"), start("b")])
    items = await provider.fetch_orchestration_items(2, LEASE)
    assert len(items) == 2
    locks = table(provider, "instance_locks")
    first = threading.Event()
    attempts = 0

    def other() -> None:
        with psycopg.connect(pg_dsn) as conn, conn.transaction():
            conn.execute(
                sql.SQL("UPDATE {} SET locked_until_ms = locked_until_ms WHERE instance_id = 'b'").format(
                    locks
                )
            )
            first.set()
            conn.execute("SELECT pg_sleep(0.3)")
            conn.execute(
                sql.SQL("UPDATE {} SET locked_until_ms = locked_until_ms WHERE instance_id = 'a'").format(
                    locks
                )
            )

    thread = threading.Thread(target=other)
    thread.start()
    await asyncio.to_thread(first.wait, 5)

    async def body(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        async with conn.transaction():
            await conn.execute(
                sql.SQL("UPDATE {} SET locked_until_ms = locked_until_ms WHERE instance_id = 'a'").format(
                    locks
                )
            )
            await conn.execute(
                sql.SQL("UPDATE {} SET locked_until_ms = locked_until_ms WHERE instance_id = 'b'").format(
                    locks
                )
            )

    try:
        await provider._run("test", body)
    finally:
        await asyncio.to_thread(thread.join, 10)
    # Either side may be the victim; if it was ours, the provider retried.
    assert attempts in (1, 2)


async def test_unreachable_server_fails_open_retryably(schema: str) -> None:
    provider = PostgresProvider(
        "host=127.0.0.1 port=1 user=postgres dbname=x", schema=schema, connect_timeout=1
    )
    with pytest.raises(ProviderError) as raised:
        await provider.open()
    assert raised.value.retryable
    await provider.close()


async def test_calls_before_open_and_after_close_fail_permanently(pg_dsn: str, schema: str) -> None:
    provider = PostgresProvider(pg_dsn, schema=schema)
    with pytest.raises(ProviderError) as raised:
        await provider.get_instance("a")
    assert not raised.value.retryable
    await provider.open()
    await provider.open()  # idempotent
    await provider.close()
    await provider.close()  # idempotent
    with pytest.raises(ProviderError) as raised:
        await provider.fetch_work_items(1, LEASE)
    assert not raised.value.retryable
    with pytest.raises(ProviderError):
        await provider.open()


async def test_missing_tables_are_a_permanent_error_with_a_hint(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(sql.SQL("DROP TABLE {}").format(table(pg_provider, "history")))
    with pytest.raises(ProviderError) as raised:
        await pg_provider.read_history("a")
    assert not raised.value.retryable
    assert "migrate" in raised.value.message


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (pg_errors.AdminShutdown("terminating connection due to administrator command"), True),
        (pg_errors.QueryCanceled("canceling statement due to statement timeout"), True),
        (pg_errors.DeadlockDetected("deadlock"), True),
        (pg_errors.SerializationFailure("serialize"), True),
        (pg_errors.LockNotAvailable("lock"), True),
        (pg_errors.TooManyConnections("too many"), True),
        (pg_errors.FeatureNotSupported("cached plan must not change result type"), True),
        (psycopg.InterfaceError("the connection is closed"), True),
        (PoolTimeout("couldn't get a connection after 5.00 sec"), True),
        (ConnectionResetError("reset"), True),
        (pg_errors.UniqueViolation("duplicate key"), False),
        (pg_errors.CheckViolation("check"), False),
        (pg_errors.UndefinedTable("relation does not exist"), False),
        (pg_errors.InvalidTextRepresentation("bad"), False),
        (PoolClosed("closed"), False),
        (ValueError("bad input"), False),
    ],
)
def test_error_classification(exc: Exception, retryable: bool) -> None:
    error = to_provider_error("op", exc, schema="s")
    assert isinstance(error, ProviderError)
    assert error.retryable is retryable
    assert error.operation == "op"


def test_connection_errors_are_recognised() -> None:
    assert is_connection_error(psycopg.OperationalError("gone"))
    assert is_connection_error(pg_errors.AdminShutdown("bye"))
    assert is_connection_error(PoolTimeout("t"))
    assert not is_connection_error(pg_errors.QueryCanceled("timeout"))
    assert not is_connection_error(pg_errors.UniqueViolation("dup"))


def test_provider_errors_pass_through() -> None:
    original = ProviderError("a", "b", retryable=False)
    assert to_provider_error("c", original) is original
