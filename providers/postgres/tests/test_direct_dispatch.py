"""Direct dispatch on PostgreSQL: what the stored rows look like, which notifications are (not) sent,
racing providers on separate pools, dropped connections and deadlock retries on the new paths, and
the documented runtime role's grants."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from pg_helpers import LEASE, count, enqueue, event, eventually, first_ack, start, table
from psycopg import errors as pg_errors
from psycopg import sql
from test_faults import TableLock

from perdure.history import (
    ActivityCompleted,
    ActivityExecute,
    ActivityResult,
    ActivityScheduled,
    Event,
    EventRaised,
)
from perdure.provider import OrchestrationAck, OrchestrationItem, ProviderError, WorkItemAck, WorkItemLease
from perdure_postgres import PostgresProvider
from perdure_postgres import provider as provider_module
from perdure_postgres._wakeups import channel_names

TOKEN = re.compile(r"^(\d+):([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def db_now_ms(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def result_for(lease: WorkItemLease) -> ActivityResult:
    return ActivityResult(
        instance_id=lease.ref.instance_id,
        execution_id=lease.ref.execution_id,
        source_id=lease.ref.activity_id,
        result='"r"',
    )


def event_raised(event_id: int) -> Event:
    return EventRaised(event_id=event_id, timestamp_ms=0, name="e", data="1")


def consume(item: OrchestrationItem, history: list[Event] | None = None, **fields: Any) -> OrchestrationAck:
    """An ack of a later turn: ``history`` (default none), no status change."""
    return dataclasses.replace(first_ack(item), history=history or [], status=None, **fields)


def next_step(item: OrchestrationItem, completed: int) -> OrchestrationAck:
    """A chain step's turn: activity ``completed`` is done, ``completed + 2`` is scheduled and leased."""
    activity = completed + 2
    history: list[Event] = [
        ActivityCompleted(event_id=completed + 1, timestamp_ms=0, source_id=completed, result='"r"'),
        ActivityScheduled(event_id=activity, timestamp_ms=0, name="act", input="1"),
    ]
    work = ActivityExecute(
        instance_id=item.instance_id, execution_id=1, activity_id=activity, name="act", input="1"
    )
    return consume(item, history, worker_items=[work], lease_worker_items=1)


async def lease_directly(
    provider: PostgresProvider, instance_id: str, activities: int = 1
) -> list[WorkItemLease]:
    """Start ``instance_id`` with a first turn that schedules ``activities`` activities, all leased."""
    await enqueue(provider, start(instance_id))
    [item] = [i for i in await provider.fetch_orchestration_items(10, LEASE) if i.instance_id == instance_id]
    [leases] = await provider.ack_orchestration_items(
        [first_ack(item, activities=activities, lease_worker_items=activities)]
    )
    assert isinstance(leases, list) and len(leases) == activities, leases
    return leases


class Notifications:
    """A raw LISTEN on the schema's channels, read up to a marker the provider posts last.

    The provider's notifier sends what was posted in posting order (coalesced), so anything an
    ack posted arrives no later than a marker posted after it: what precedes the marker is exactly
    what the ack (and the calls before it) sent.
    """

    def __init__(self, dsn: str, provider: PostgresProvider) -> None:
        self.dsn = dsn
        self.provider = provider
        self.work_channel, self.instance_channel = channel_names(provider.schema)
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> Notifications:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        for channel in (self.work_channel, self.instance_channel):
            await self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        await self.conn.close()

    async def sent(self) -> list[tuple[str, str]]:
        """``(channel kind "w"/"i", payload body)`` of every notification up to a fresh marker."""
        assert self.conn is not None
        marker = f"marker-{uuid.uuid4().hex[:8]}"
        self.provider._committed(instances=[marker])
        seen: list[tuple[str, str]] = []
        async with asyncio.timeout(10):
            while True:
                async for notify in self.conn.notifies(timeout=0.5):
                    body = notify.payload.partition(":")[2]
                    if notify.channel == self.instance_channel and body == marker:
                        return seen
                    seen.append(("w" if notify.channel == self.work_channel else "i", body))


@pytest.fixture
async def notifications(pg_provider: PostgresProvider, pg_dsn: str) -> AsyncIterator[Notifications]:
    async with Notifications(pg_dsn, pg_provider) as listening:
        await listening.sent()  # start from a clean slate
        yield listening


# -- stored rows ------------------------------------------------------------------------------------


async def test_a_direct_lease_is_stored_like_a_fetched_one_in_database_time(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    await enqueue(pg_provider, start("a"))
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    before = db_now_ms(admin)
    [leases] = await pg_provider.ack_orchestration_items(
        [first_ack(item, activities=2, lease_worker_items=1, worker_lease_timeout=10.0)]
    )
    after = db_now_ms(admin)
    assert isinstance(leases, list)
    [lease] = leases
    match = TOKEN.match(lease.lock_token)
    assert match is not None, lease.lock_token
    rows = admin.execute(
        sql.SQL(
            "SELECT id, activity_id, lock_token, locked_until_ms, attempt_count FROM {} ORDER BY id"
        ).format(table(pg_provider, "worker_queue"))
    ).fetchall()
    (leased_id, leased_act, stored, until, attempts), (_, free_act, free_token, free_until, free_attempts) = (
        rows
    )
    assert (leased_act, free_act) == (2, 3), "the first worker item is the leased one, inserted first"
    assert (int(match[1]), match[2]) == (leased_id, stored), "the token is <row id>:<stored uuid>"
    assert before + 10_000 - 50 <= until <= after + 10_000 + 50
    assert attempts == 1
    assert (free_token, free_until, free_attempts) == (None, None, 0)
    # Renewal, like a fetched lease, goes to the row by id and checks the stored part.
    assert await pg_provider.renew_work_item_locks([lease.lock_token, f"{leased_id}:{uuid.uuid4()}"], 5) == [
        True,
        False,
    ]


async def test_a_fetched_lease_has_the_same_token_shape(pg_provider: PostgresProvider) -> None:
    await enqueue(pg_provider, start("a"))
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    assert await pg_provider.ack_orchestration_items([first_ack(item, activities=1)]) == [None]
    [lease] = await pg_provider.fetch_work_items(1, LEASE)
    assert TOKEN.match(lease.lock_token), lease.lock_token
    assert await pg_provider.ack_work_items([WorkItemAck(lease.lock_token, result_for(lease))]) == [None]


async def test_a_direct_lock_is_a_lock_row_like_a_fetched_one(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    [lease] = await lease_directly(pg_provider, "a")
    await enqueue(pg_provider, event("a"))  # an earlier message is tagged too, its count raised
    before = db_now_ms(admin)
    [item] = await pg_provider.ack_work_items(
        [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=7.0)]
    )
    after = db_now_ms(admin)
    assert isinstance(item, OrchestrationItem)
    assert [type(m).__name__ for m in item.messages] == ["RaiseEvent", "ActivityResult"]
    assert item.attempt_count == 1
    assert item.instance is not None and item.instance.last_event_id == 2
    row = admin.execute(
        sql.SQL("SELECT lock_token, locked_until_ms FROM {} WHERE instance_id = 'a'").format(
            table(pg_provider, "instance_locks")
        )
    ).fetchone()
    assert row is not None and row[0] == item.lock_token
    assert before + 7_000 - 50 <= row[1] <= after + 7_000 + 50
    assert count(admin, pg_provider, "orchestrator_queue", f"lock_token = '{item.lock_token}'") == 2


# -- notifications ------------------------------------------------------------------------------------


async def test_a_turn_whose_activities_are_all_leased_notifies_no_worker(
    pg_provider: PostgresProvider, notifications: Notifications
) -> None:
    await enqueue(pg_provider, start("a"), start("b"))
    items = {i.instance_id: i for i in await pg_provider.fetch_orchestration_items(2, LEASE)}
    await notifications.sent()
    results = await pg_provider.ack_orchestration_items(
        [first_ack(items["a"], activities=2, lease_worker_items=2)]
    )
    assert isinstance(results[0], list)
    assert [body for kind, body in await notifications.sent() if kind == "w"] == []
    # One item left for fetchers: the worker channel hears of it.
    results = await pg_provider.ack_orchestration_items(
        [first_ack(items["b"], activities=2, lease_worker_items=1)]
    )
    assert isinstance(results[0], list)
    assert [body for kind, body in await notifications.sent() if kind == "w"] == ["w"]


async def test_instance_notifications_only_for_creation_status_and_custom_status(
    pg_provider: PostgresProvider, notifications: Notifications
) -> None:
    async def turn(make: Any) -> None:
        [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
        assert await pg_provider.ack_orchestration_items([make(item)]) == [None]

    def instance_bodies(sent: list[tuple[str, str]]) -> list[str]:
        return [body for kind, body in sent if kind == "i"]

    # Created by an ack without a status: notified (the instance now exists).
    await enqueue(pg_provider, start("a"))
    await turn(lambda item: dataclasses.replace(first_ack(item), status=None))
    assert instance_bodies(await notifications.sent()) == ["a"]
    # History only: nobody is told.
    await enqueue(pg_provider, event("a"))
    await turn(lambda item: consume(item, [event_raised(2)]))
    assert instance_bodies(await notifications.sent()) == []
    # A custom status change, then a status change: notified.
    await enqueue(pg_provider, event("a"))
    await turn(lambda item: consume(item, custom_status_changed=True, custom_status='"x"'))
    assert instance_bodies(await notifications.sent()) == ["a"]
    await enqueue(pg_provider, event("a"))
    await turn(
        lambda item: dataclasses.replace(first_ack(item), history=[event_raised(3)], status="completed")
    )
    assert instance_bodies(await notifications.sent()) == ["a"]


async def test_a_chain_step_by_direct_dispatch_sends_no_notification(
    pg_provider: PostgresProvider, notifications: Notifications
) -> None:
    """Turn ack leasing its activity, activity ack locking the next turn: no NOTIFY at all."""
    [lease] = await lease_directly(pg_provider, "a")
    await notifications.sent()  # the start and the creation
    for _ in range(3):
        [item] = await pg_provider.ack_work_items(
            [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE)]
        )
        assert isinstance(item, OrchestrationItem)
        [leases] = await pg_provider.ack_orchestration_items([next_step(item, lease.ref.activity_id)])
        assert isinstance(leases, list)
        [lease] = leases
    assert lease.ref.activity_id == 8
    assert await notifications.sent() == []


async def test_a_completion_not_locked_directly_is_notified(
    pg_provider: PostgresProvider, make_provider: Any, notifications: Notifications
) -> None:
    [lease] = await lease_directly(pg_provider, "a")
    other = await make_provider()
    await enqueue(other, event("a"))
    [held] = await other.fetch_orchestration_items(1, LEASE)  # another runtime holds "a"
    await notifications.sent()
    assert await pg_provider.ack_work_items(
        [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE)]
    ) == [None]
    assert ("w", "o") in await notifications.sent()
    assert await other.ack_orchestration_items([consume(held)]) == [None]
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    assert [type(m).__name__ for m in item.messages] == ["ActivityResult"]


# -- races between providers on separate pools ----------------------------------------------------------


@pytest.mark.parametrize("round_", range(3))
async def test_direct_locks_and_fetches_never_hold_one_instance_twice(
    make_provider: Any, round_: int
) -> None:
    """Work acks locking directly (two providers) race fetchers (two more) for the same instances;
    every instance is held by one of them at a time, and every message is handled exactly once."""
    workers = [await make_provider(max_pool_size=3) for _ in range(2)]
    fetchers = [await make_provider(max_pool_size=3) for _ in range(2)]
    n = 40
    instances = [f"i{k}" for k in range(n)]
    await enqueue(workers[0], *(start(i) for i in instances))
    leases: list[WorkItemLease] = []
    for batch in await_batches(await workers[0].fetch_orchestration_items(n, LEASE)):
        results = await workers[0].ack_orchestration_items(
            [first_ack(item, activities=1, lease_worker_items=1) for item in batch]
        )
        for result in results:
            assert isinstance(result, list)
            leases.extend(result)
    # Something for the fetchers to claim on every instance, racing the completions.
    await enqueue(fetchers[0], *(event(i) for i in instances))
    held: dict[str, str] = {}
    seen: Counter[str] = Counter()
    done = asyncio.Event()

    async def handle(items: list[OrchestrationItem]) -> None:
        for item in items:
            assert item.instance_id not in held, f"{item.instance_id} held twice"
            held[item.instance_id] = item.lock_token
            seen.update(f"{item.instance_id}/{type(m).__name__}" for m in item.messages)
        await asyncio.sleep(0.002)  # hold the locks a moment, racing the others
        for item in items:
            await workers[0].renew_orchestration_lock(item.lock_token, LEASE)  # still ours
            del held[item.instance_id]
        results = await workers[0].ack_orchestration_items([consume(item) for item in items])
        assert results == [None] * len(items)

    async def work(provider: PostgresProvider, mine: list[WorkItemLease]) -> None:
        for k in range(0, len(mine), 3):
            batch = mine[k : k + 3]
            results = await provider.ack_work_items(
                [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE) for lease in batch]
            )
            await handle([r for r in results if isinstance(r, OrchestrationItem)])
            assert not [r for r in results if isinstance(r, ProviderError)]

    async def fetch(provider: PostgresProvider) -> None:
        while not done.is_set() or sum(seen.values()) < 2 * n:
            items = await provider.fetch_orchestration_items(4, LEASE)
            if items:
                await handle(items)
            else:
                await asyncio.sleep(0.002)

    fetching = [asyncio.ensure_future(fetch(p)) for p in fetchers for _ in range(2)]
    try:
        await asyncio.gather(work(workers[0], leases[0::2]), work(workers[1], leases[1::2]))
        done.set()
        await asyncio.wait_for(asyncio.gather(*fetching), 30)
    finally:
        for task in fetching:
            task.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)
    assert seen == Counter(
        {**{f"{i}/RaiseEvent": 1 for i in instances}, **{f"{i}/ActivityResult": 1 for i in instances}}
    )


def await_batches(items: list[OrchestrationItem], size: int = 7) -> list[list[OrchestrationItem]]:
    return [items[k : k + size] for k in range(0, len(items), size)]


# -- failures on the new paths ----------------------------------------------------------------------------


async def test_a_direct_turn_ack_on_a_killed_connection_is_retryable_and_can_be_repeated(
    make_provider: Any, admin: psycopg.Connection[Any], pg_dsn: str
) -> None:
    provider = await make_provider(application_name="perdure-direct-kill")
    await enqueue(provider, start("a"))
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    ack = first_ack(item, activities=1, lease_worker_items=1)
    async with TableLock(pg_dsn, table(provider, "worker_queue")):
        call = asyncio.ensure_future(provider.ack_orchestration_items([ack]))
        pid = await blocked_backend(admin, "perdure-direct-kill")
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        [error] = await asyncio.wait_for(call, 10)
    assert isinstance(error, ProviderError) and error.retryable
    # Nothing was committed: the lock is still held and the same ack goes through.
    [leases] = await provider.ack_orchestration_items([ack])
    assert isinstance(leases, list) and len(leases) == 1
    assert await provider.fetch_work_items(5, LEASE) == []


async def test_a_direct_work_ack_on_a_killed_connection_is_retryable_and_can_be_repeated(
    make_provider: Any, admin: psycopg.Connection[Any], pg_dsn: str
) -> None:
    provider = await make_provider(application_name="perdure-direct-kill2")
    [lease] = await lease_directly(provider, "a")
    ack = WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE)
    async with TableLock(pg_dsn, table(provider, "instance_locks")):
        call = asyncio.ensure_future(provider.ack_work_items([ack]))
        pid = await blocked_backend(admin, "perdure-direct-kill2")
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        [error] = await asyncio.wait_for(call, 10)
    assert isinstance(error, ProviderError) and error.retryable
    [item] = await provider.ack_work_items([ack])
    assert isinstance(item, OrchestrationItem) and len(item.messages) == 1


async def blocked_backend(admin: psycopg.Connection[Any], application_name: str) -> int:
    pids: list[int] = []

    def blocked() -> bool:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (application_name,),
        ).fetchone()
        if row:
            pids.append(row[0])
        return bool(row)

    await eventually(blocked)
    return pids[-1]


@pytest.mark.parametrize("statement", ["ack_orchestration", "ack_work_lock"])
async def test_deadlocks_on_the_direct_paths_are_retried(
    pg_provider: PostgresProvider, monkeypatch: pytest.MonkeyPatch, statement: str
) -> None:
    [lease] = await lease_directly(pg_provider, "a")
    await enqueue(pg_provider, start("b"))
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    target = getattr(pg_provider._sql, statement)
    failures = 0
    real = provider_module._execute

    async def flaky(conn: Any, query: bytes, params: dict[str, Any]) -> Any:
        nonlocal failures
        if query == target and failures < 2:
            failures += 1
            raise pg_errors.DeadlockDetected("deadlock detected")
        return await real(conn, query, params)

    monkeypatch.setattr(provider_module, "_execute", flaky)
    if statement == "ack_orchestration":
        [leases] = await pg_provider.ack_orchestration_items(
            [first_ack(item, activities=1, lease_worker_items=1)]
        )
        assert isinstance(leases, list) and len(leases) == 1
    else:
        [locked] = await pg_provider.ack_work_items(
            [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE)]
        )
        assert isinstance(locked, OrchestrationItem)
    assert failures == 2


# -- the documented runtime role -----------------------------------------------------------------------------


async def test_direct_dispatch_needs_no_grant_beyond_the_documented_dml(
    make_provider: Any, admin: psycopg.Connection[Any], pg_dsn: str, schema: str
) -> None:
    """The runtime role of docs/postgres-deployment.md (DML on the tables, nothing on sequences)."""
    await make_provider()  # migrate the schema as the owner
    role = f"perdure_app_{uuid.uuid4().hex[:8]}"
    try:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test user cannot create roles")
    try:
        ident = sql.Identifier(schema)
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(ident, sql.Identifier(role)))
        admin.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}").format(
                ident, sql.Identifier(role)
            )
        )
        app = await make_provider(dsn=re.sub(r"\buser=\S+", f"user={role}", pg_dsn), migrate=False)
        [lease] = await lease_directly(app, "a")
        [item] = await app.ack_work_items(
            [WorkItemAck(lease.lock_token, result_for(lease), lock_instance=LEASE)]
        )
        assert isinstance(item, OrchestrationItem)
        await app.close()
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
