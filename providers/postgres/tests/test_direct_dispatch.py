"""Direct dispatch on PostgreSQL: what the stored rows look like, which notifications are (not) sent,
racing providers on separate pools, dropped connections and deadlock retries on the new paths, the
documented runtime role's grants, and kept locks with work items consumed in memory (one statement
per chain step, exclusivity, the keep decision, lost leases failing one ack of a batch)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from pg_helpers import LEASE, count, enqueue, event, eventually, first_ack, now_ms, start, table
from psycopg import errors as pg_errors
from psycopg import sql
from test_faults import TableLock
from test_wakeups import WAKE_BOUND, timed_wait

from perdure.history import (
    ActivityCompleted,
    ActivityExecute,
    ActivityResult,
    ActivityScheduled,
    Event,
    EventRaised,
    Message,
    TimerElapsed,
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


# -- kept locks and work items consumed in memory ------------------------------------------------------


async def kept_start(
    provider: PostgresProvider, instance_id: str, keep: float = LEASE
) -> tuple[str, WorkItemLease]:
    """Start ``instance_id`` with a first turn that leases its one activity and keeps the lock."""
    await enqueue(provider, start(instance_id))
    [item] = [i for i in await provider.fetch_orchestration_items(10, LEASE) if i.instance_id == instance_id]
    [leases] = await provider.ack_orchestration_items(
        [first_ack(item, activities=1, lease_worker_items=1, keep_lock=keep)]
    )
    assert isinstance(leases, list) and len(leases) == 1, leases
    return item.lock_token, leases[0]


def held_step(
    instance_id: str, lock_token: str, lease: WorkItemLease, keep: float | None = LEASE, **fields: Any
) -> OrchestrationAck:
    """The next turn of a held instance, run with no call in between: the activity of ``lease``
    completed (its result applied in memory), the next activity scheduled and leased, the lock kept."""
    completed = lease.ref.activity_id
    activity = completed + 2
    history: list[Event] = [
        ActivityCompleted(event_id=completed + 1, timestamp_ms=0, source_id=completed, result='"r"'),
        ActivityScheduled(event_id=activity, timestamp_ms=0, name="act", input="1"),
    ]
    work = ActivityExecute(
        instance_id=instance_id, execution_id=1, activity_id=activity, name="act", input="1"
    )
    return OrchestrationAck(
        lock_token=lock_token,
        instance_id=instance_id,
        execution_id=1,
        name="wf",
        history=history,
        worker_items=[work],
        lease_worker_items=1,
        keep_lock=keep,
        completed_work_items=[lease.lock_token],
        **fields,
    )


def lock_row(admin: psycopg.Connection[Any], provider: PostgresProvider, instance_id: str) -> Any:
    """``(lock_token, locked_until_ms)`` of the instance's lock row, or None."""
    return admin.execute(
        sql.SQL("SELECT lock_token, locked_until_ms FROM {} WHERE instance_id = %s").format(
            table(provider, "instance_locks")
        ),
        (instance_id,),
    ).fetchone()


def worker_ids(admin: psycopg.Connection[Any], provider: PostgresProvider) -> list[int]:
    rows = admin.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(table(provider, "worker_queue")))
    return [row[0] for row in rows.fetchall()]


def history_ids(admin: psycopg.Connection[Any], provider: PostgresProvider, instance_id: str) -> list[int]:
    rows = admin.execute(
        sql.SQL("SELECT event_id FROM {} WHERE instance_id = %s ORDER BY event_id").format(
            table(provider, "history")
        ),
        (instance_id,),
    )
    return [row[0] for row in rows.fetchall()]


def row_id(lease: WorkItemLease) -> int:
    return int(lease.lock_token.partition(":")[0])


class StatementCounter:
    """Counts the statements a provider sends (every provider statement goes through ``_execute``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queries: list[bytes] = []
        real = provider_module._execute

        async def counting(conn: Any, query: bytes, params: dict[str, Any]) -> Any:
            self.queries.append(query)
            return await real(conn, query, params)

        monkeypatch.setattr(provider_module, "_execute", counting)


async def test_a_kept_lock_keeps_its_row_and_token_with_a_lease_in_database_time(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    await enqueue(pg_provider, start("a"))
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    before = db_now_ms(admin)
    [leases] = await pg_provider.ack_orchestration_items(
        [first_ack(item, activities=1, lease_worker_items=1, keep_lock=7.0)]
    )
    after = db_now_ms(admin)
    assert isinstance(leases, list) and len(leases) == 1
    token, until = lock_row(admin, pg_provider, "a")
    assert token == item.lock_token
    assert before + 7_000 - 50 <= until <= after + 7_000 + 50
    assert count(admin, pg_provider, "orchestrator_queue") == 0, "the tagged start was consumed"
    # The kept lock is an ordinary lock: renewable, and abandoning it releases the instance.
    await pg_provider.renew_orchestration_lock(item.lock_token, 20.0)
    await pg_provider.abandon_orchestration_item(item.lock_token)
    assert lock_row(admin, pg_provider, "a") is None


async def test_a_chain_step_on_a_kept_lock_is_one_statement_and_no_notification(
    pg_provider: PostgresProvider,
    admin: psycopg.Connection[Any],
    notifications: Notifications,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of keep_lock and completed_work_items: one round trip per step of a chain."""
    token, lease = await kept_start(pg_provider, "a")
    await notifications.sent()  # the start and the creation
    counter = StatementCounter(monkeypatch)
    for _ in range(3):
        [leases] = await pg_provider.ack_orchestration_items([held_step("a", token, lease)])
        assert isinstance(leases, list)
        [new] = leases
        assert worker_ids(admin, pg_provider) == [row_id(new)], "the consumed item is deleted"
        lease = new
    assert counter.queries == [pg_provider._sql.ack_orchestration_direct] * 3
    assert lease.ref.activity_id == 8
    assert history_ids(admin, pg_provider, "a") == list(range(1, 9))
    assert lock_row(admin, pg_provider, "a")[0] == token
    assert await notifications.sent() == []


async def test_a_kept_lock_is_exclusive_against_other_providers_until_it_lapses(
    pg_provider: PostgresProvider, make_provider: Any, admin: psycopg.Connection[Any]
) -> None:
    token, lease = await kept_start(pg_provider, "a", keep=1.0)
    other = await make_provider()
    await enqueue(other, event("a"))  # arrives during the kept lock
    assert await other.fetch_orchestration_items(5, LEASE) == []
    # A work ack from elsewhere that would lock the instance directly finds it locked too.
    await enqueue(other, start("b"))
    [item_b] = await other.fetch_orchestration_items(5, LEASE)
    [[lease_b]] = await other.ack_orchestration_items([first_ack(item_b, activities=1, lease_worker_items=1)])
    other_result = ActivityResult(instance_id="a", execution_id=1, source_id=99, result='"x"')
    assert await other.ack_work_items(
        [WorkItemAck(lease_b.lock_token, other_result, lock_instance=LEASE)]
    ) == [None]
    assert await other.fetch_orchestration_items(5, LEASE) == []
    await asyncio.sleep(1.1)
    [item] = await other.fetch_orchestration_items(5, LEASE)
    assert item.instance_id == "a" and item.lock_token != token
    assert [type(m).__name__ for m in item.messages] == ["RaiseEvent", "ActivityResult"]
    # The lapsed holder's next step fails as a lost lock and changes nothing.
    [error] = await pg_provider.ack_orchestration_items([held_step("a", token, lease)])
    assert isinstance(error, ProviderError) and not error.retryable
    assert history_ids(admin, pg_provider, "a") == [1, 2]
    assert row_id(lease) in worker_ids(admin, pg_provider)
    assert lock_row(admin, pg_provider, "a")[0] == item.lock_token


async def test_a_message_that_arrived_during_the_turn_releases_the_lock_and_wakes_fetchers(
    pg_provider: PostgresProvider,
    make_provider: Any,
    admin: psycopg.Connection[Any],
    notifications: Notifications,
) -> None:
    token, lease = await kept_start(pg_provider, "a")
    other = await make_provider()
    await enqueue(other, event("a"))
    await notifications.sent()
    [leases] = await pg_provider.ack_orchestration_items([held_step("a", token, lease)])
    assert isinstance(leases, list) and len(leases) == 1
    assert lock_row(admin, pg_provider, "a") is None, "released, not kept"
    assert row_id(lease) not in worker_ids(admin, pg_provider), "the consumed item is still deleted"
    assert ("w", "o") in await notifications.sent()
    [item] = await other.fetch_orchestration_items(5, LEASE)
    assert [type(m).__name__ for m in item.messages] == ["RaiseEvent"]


@pytest.mark.parametrize("same_provider", [True, False], ids=["same-provider", "other-provider"])
async def test_a_message_that_arrived_during_a_kept_lock_wakes_waiters_when_the_next_ack_releases_it(
    make_provider: Any, same_provider: bool
) -> None:
    """A fetcher told of a message for a held instance finds it locked and waits again; the next
    step's ack, which must release the lock for that message, must wake it."""
    runtime = await make_provider()
    fetcher = runtime if same_provider else await make_provider()
    token, lease = await kept_start(runtime, "a")
    await fetcher.enqueue_orchestrator_messages([event("a")])
    await fetcher.wait_for_work("orchestrator", 5)
    assert await fetcher.fetch_orchestration_items(1, LEASE) == []  # held: back to waiting
    waiter = await timed_wait(fetcher, "orchestrator")
    sent = time.monotonic()
    [leases] = await runtime.ack_orchestration_items([held_step("a", token, lease)])
    assert isinstance(leases, list)
    assert await asyncio.wait_for(waiter, 5) - sent < WAKE_BOUND
    [item] = await fetcher.fetch_orchestration_items(1, LEASE)
    assert [type(m).__name__ for m in item.messages] == ["RaiseEvent"]


@pytest.mark.parametrize("kind", ["event", "due-timer", "future-timer"])
async def test_the_acks_own_message_to_its_instance_releases_the_lock_unless_it_is_not_due(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any], kind: str
) -> None:
    """The ack's own messages are inserted by the same statement, invisible to the keep decision."""
    token, lease = await kept_start(pg_provider, "a")
    message: Message = event("a")
    if kind != "event":
        due = now_ms() + (-1_000 if kind == "due-timer" else 60_000)
        message = TimerElapsed(instance_id="a", execution_id=1, source_id=9, fire_at_ms=due)
    [leases] = await pg_provider.ack_orchestration_items(
        [held_step("a", token, lease, orchestrator_items=[message])]
    )
    assert isinstance(leases, list)
    row = lock_row(admin, pg_provider, "a")
    if kind == "future-timer":
        assert row is not None and row[0] == token
        assert await pg_provider.fetch_orchestration_items(1, LEASE) == []
    else:
        assert row is None
        [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
        assert [type(m).__name__ for m in item.messages] == [type(message).__name__]


async def test_a_message_from_another_ack_of_the_batch_releases_the_lock(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    """The batch inserts its messages in the same statement (invisible to the keep decision)."""
    token, lease = await kept_start(pg_provider, "a")
    await enqueue(pg_provider, start("b"))
    [item_b] = await pg_provider.fetch_orchestration_items(1, LEASE)
    results = await pg_provider.ack_orchestration_items(
        [first_ack(item_b, orchestrator_items=[event("a")]), held_step("a", token, lease)]
    )
    assert results[0] is None and isinstance(results[1], list)
    assert lock_row(admin, pg_provider, "a") is None
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    assert item.instance_id == "a" and [type(m).__name__ for m in item.messages] == ["RaiseEvent"]


def lose_lease(
    how: str, admin: psycopg.Connection[Any], provider: PostgresProvider, lease: WorkItemLease
) -> str:
    """Make ``lease`` not held in one of the ways it can happen; return the token the ack lists."""
    worker = table(provider, "worker_queue")
    where = sql.SQL(" WHERE id = %s")
    if how == "cancelled":
        admin.execute(sql.SQL("DELETE FROM {}").format(worker) + where, (row_id(lease),))
    elif how == "expired":
        admin.execute(sql.SQL("UPDATE {} SET locked_until_ms = 0").format(worker) + where, (row_id(lease),))
    elif how == "taken-over":
        admin.execute(
            sql.SQL("UPDATE {} SET lock_token = gen_random_uuid()::text").format(worker) + where,
            (row_id(lease),),
        )
    elif how == "wrong-uuid":
        return f"{row_id(lease)}:{uuid.uuid4()}"
    elif how == "malformed":
        return "not-a-lease"
    return lease.lock_token


@pytest.mark.parametrize("how", ["cancelled", "expired", "taken-over", "wrong-uuid", "malformed"])
async def test_a_lost_consumed_lease_fails_only_its_ack_of_the_batch_and_changes_nothing(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any], how: str
) -> None:
    token_a, lease_a = await kept_start(pg_provider, "a")
    token_b, lease_b = await kept_start(pg_provider, "b")
    token_c, lease_c = await kept_start(pg_provider, "c")
    listed = lose_lease(how, admin, pg_provider, lease_b)
    lock_b = lock_row(admin, pg_provider, "b")
    workers = set(worker_ids(admin, pg_provider))
    bad = dataclasses.replace(held_step("b", token_b, lease_b), completed_work_items=[listed])
    results = await pg_provider.ack_orchestration_items(
        [held_step("a", token_a, lease_a), bad, held_step("c", token_c, lease_c)]
    )
    assert isinstance(results[0], list) and isinstance(results[2], list)
    error = results[1]
    assert isinstance(error, ProviderError) and not error.retryable
    assert listed in error.message, "the error names the lease that is not held"
    # Nothing of b's ack: no history, no new worker item, its (kept) lock untouched.
    assert history_ids(admin, pg_provider, "b") == [1, 2]
    assert lock_row(admin, pg_provider, "b") == lock_b
    after = set(worker_ids(admin, pg_provider))
    assert workers - after == {row_id(lease_a), row_id(lease_c)}
    assert after - workers == {row_id(results[0][0]), row_id(results[2][0])}
    assert history_ids(admin, pg_provider, "a") == history_ids(admin, pg_provider, "c") == [1, 2, 3, 4]


async def test_an_ack_whose_lock_is_lost_keeps_the_consumed_items(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    token, lease = await kept_start(pg_provider, "a")
    await pg_provider.abandon_orchestration_item(token)
    [error] = await pg_provider.ack_orchestration_items([held_step("a", token, lease)])
    assert isinstance(error, ProviderError) and not error.retryable and token in error.message
    assert worker_ids(admin, pg_provider) == [row_id(lease)]
    # The lease is still ours: the activity's result can take the queue instead.
    assert await pg_provider.ack_work_items([WorkItemAck(lease.lock_token, result_for(lease))]) == [None]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_a_consumed_lease_changed_while_the_ack_waits_for_its_row_is_checked_again(
    make_provider: Any, admin: psycopg.Connection[Any], pg_dsn: str, outcome: str
) -> None:
    """A fetch taking over a lease as it lapses races the ack: the ack locks the rows it consumes
    and checks the lease on the row as committed, so the item is never both consumed and re-run."""
    provider = await make_provider(application_name="perdure-held-race")
    token, lease = await kept_start(provider, "a")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as rival:
        await rival.execute(
            sql.SQL("UPDATE {} SET lock_token = gen_random_uuid()::text WHERE id = %s").format(
                table(provider, "worker_queue")
            ),
            (row_id(lease),),
        )
        call = asyncio.ensure_future(provider.ack_orchestration_items([held_step("a", token, lease)]))
        await blocked_backend(admin, "perdure-held-race")
        await (rival.commit() if outcome == "commit" else rival.rollback())
        [result] = await asyncio.wait_for(call, 10)
    if outcome == "commit":
        assert isinstance(result, ProviderError) and not result.retryable
        assert history_ids(admin, provider, "a") == [1, 2]
        assert worker_ids(admin, provider) == [row_id(lease)]
        assert lock_row(admin, provider, "a")[0] == token
    else:
        assert isinstance(result, list) and len(result) == 1
        assert worker_ids(admin, provider) == [row_id(result[0])]


@pytest.mark.parametrize("keep_lock", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_bad_keep_lock_fails_only_its_ack(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any], keep_lock: float
) -> None:
    await enqueue(pg_provider, start("a"), start("b"))
    items = await pg_provider.fetch_orchestration_items(2, LEASE)
    results = await pg_provider.ack_orchestration_items(
        [first_ack(items[0], keep_lock=keep_lock), first_ack(items[1], keep_lock=5.0)]
    )
    assert isinstance(results[0], ProviderError) and not results[0].retryable
    assert "keep_lock" in results[0].message
    assert results[1] is None
    assert lock_row(admin, pg_provider, items[0].instance_id)[0] == items[0].lock_token, "untouched"
    assert lock_row(admin, pg_provider, items[1].instance_id)[0] == items[1].lock_token, "kept"


async def test_deadlocks_on_a_held_step_are_retried(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, lease = await kept_start(pg_provider, "a")
    failures = 0
    real = provider_module._execute

    async def flaky(conn: Any, query: bytes, params: dict[str, Any]) -> Any:
        nonlocal failures
        if query == pg_provider._sql.ack_orchestration_direct and failures < 2:
            failures += 1
            raise pg_errors.DeadlockDetected("deadlock detected")
        return await real(conn, query, params)

    monkeypatch.setattr(provider_module, "_execute", flaky)
    [leases] = await pg_provider.ack_orchestration_items([held_step("a", token, lease)])
    assert isinstance(leases, list) and len(leases) == 1
    assert failures == 2
    assert worker_ids(admin, pg_provider) == [row_id(leases[0])]
    assert lock_row(admin, pg_provider, "a")[0] == token


@pytest.mark.parametrize("round_", range(3))
async def test_held_chains_and_fetchers_never_hold_one_instance_twice(
    make_provider: Any, round_: int
) -> None:
    """Runtimes stepping held chains (one ack per step, the lock kept) race fetchers of other
    providers that receive events for the same instances. Every ack appends the next event id, so
    two holders at once would collide on the history's primary key; every event and every activity
    result is handled exactly once."""
    holders = [await make_provider(max_pool_size=3) for _ in range(2)]
    fetchers = [await make_provider(max_pool_size=3) for _ in range(2)]
    n = 12
    instances = [f"i{k}" for k in range(n)]
    started = [await kept_start(holders[k % 2], i) for k, i in enumerate(instances)]
    fetched: set[str] = set()
    seen: Counter[str] = Counter()

    async def step(provider: PostgresProvider, instance_id: str, token: str, lease: WorkItemLease) -> None:
        """Step until the store lets the instance go; then the last result takes the queue."""
        while True:
            await asyncio.sleep(0.001)
            [result] = await provider.ack_orchestration_items([held_step(instance_id, token, lease)])
            if isinstance(result, ProviderError):
                assert "is not held" in result.message, result
                assert await provider.ack_work_items([WorkItemAck(lease.lock_token, result_for(lease))]) == [
                    None
                ]
                return
            [lease] = result

    async def fetch(provider: PostgresProvider) -> None:
        while sum(seen.values()) < 2 * n:
            items = await provider.fetch_orchestration_items(4, LEASE)
            if not items:
                await asyncio.sleep(0.002)
                continue
            for item in items:
                assert item.instance_id not in fetched, f"{item.instance_id} fetched twice at once"
                fetched.add(item.instance_id)
                seen.update(f"{item.instance_id}/{type(m).__name__}" for m in item.messages)
            await asyncio.sleep(0.002)
            acks = []
            for item in items:
                fetched.discard(item.instance_id)
                assert item.instance is not None
                acks.append(consume(item, [event_raised(item.instance.last_event_id + 1)]))
            assert await provider.ack_orchestration_items(acks) == [None] * len(items)

    async def send_events() -> None:
        for instance_id in instances:
            await asyncio.sleep(0.005)
            await enqueue(fetchers[0], event(instance_id))

    fetching = [asyncio.ensure_future(fetch(p)) for p in fetchers]
    try:
        await asyncio.wait_for(
            asyncio.gather(
                send_events(),
                *(
                    step(holders[k % 2], instance_id, token, lease)
                    for k, (instance_id, (token, lease)) in enumerate(zip(instances, started, strict=True))
                ),
            ),
            30,
        )
        await asyncio.wait_for(asyncio.gather(*fetching), 30)
    finally:
        for task in fetching:
            task.cancel()
        await asyncio.gather(*fetching, return_exceptions=True)
    assert seen == Counter(
        {**{f"{i}/RaiseEvent": 1 for i in instances}, **{f"{i}/ActivityResult": 1 for i in instances}}
    )


def test_the_plain_ack_statement_has_none_of_the_direct_parts(pg_provider: PostgresProvider) -> None:
    """Acks that use neither keep_lock nor completed_work_items pay nothing for them."""
    plain = pg_provider._sql.ack_orchestration.decode()
    direct = pg_provider._sql.ack_orchestration_direct.decode()
    for part in ("held", "relock", "keep_ms", "consumed", "k_id", "FOR UPDATE"):
        assert part not in plain and part in direct, part
    for text in (plain, direct):
        assert "[direct" not in text and "direct]" not in text and "plain]" not in text


async def test_acks_without_the_new_fields_use_the_plain_statement(
    pg_provider: PostgresProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enqueue(pg_provider, start("a"), start("b"))
    items = await pg_provider.fetch_orchestration_items(2, LEASE)
    counter = StatementCounter(monkeypatch)
    results = await pg_provider.ack_orchestration_items(
        [first_ack(items[0], activities=1, lease_worker_items=1)]
    )
    assert isinstance(results[0], list)
    results = await pg_provider.ack_orchestration_items([first_ack(items[1], keep_lock=5.0)])
    assert results == [None]
    acks = [q for q in counter.queries if q != pg_provider._sql.notify]  # the creations are notified
    assert acks == [pg_provider._sql.ack_orchestration, pg_provider._sql.ack_orchestration_direct]


async def test_consumed_items_without_keep_lock_release_the_lock(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    """completed_work_items alone (every keep_ms parameter NULL) and keep_lock alone (no consumed rows)."""
    token, lease = await kept_start(pg_provider, "a")
    [leases] = await pg_provider.ack_orchestration_items([held_step("a", token, lease, keep=None)])
    assert isinstance(leases, list) and len(leases) == 1
    assert lock_row(admin, pg_provider, "a") is None
    assert worker_ids(admin, pg_provider) == [row_id(leases[0])]
