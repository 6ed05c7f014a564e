"""PostgreSQL-specific queue behaviour: clocks, claim races across pools, the empty-claim path.

The contract itself is covered by the conformance suite (test_conformance.py); these tests pin
down how this provider meets it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from pg_helpers import LEASE, count, empty_ack, enqueue, event, first_ack, now_ms, start, table
from psycopg import sql

from perdure.history import ActivityResult, RaiseEvent, TimerElapsed
from perdure.provider import OrchestrationAck, ProviderError, WorkItemAck
from perdure_postgres import PostgresProvider


def db_now_ms(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").fetchone()
    assert row is not None
    return int(row[0])


async def test_leases_are_written_in_database_time(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    await enqueue(pg_provider, start("a"))
    before = db_now_ms(admin)
    [item] = await pg_provider.fetch_orchestration_items(1, 10.0)
    after = db_now_ms(admin)
    row = admin.execute(
        sql.SQL("SELECT locked_until_ms FROM {} WHERE lock_token = %s").format(
            table(pg_provider, "instance_locks")
        ),
        (item.lock_token,),
    ).fetchone()
    assert row is not None
    assert before + 10_000 - 50 <= row[0] <= after + 10_000 + 50


async def test_enqueued_messages_are_visible_at_database_now(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    before = db_now_ms(admin)
    await enqueue(pg_provider, start("a"))
    row = admin.execute(
        sql.SQL("SELECT visible_at_ms FROM {}").format(table(pg_provider, "orchestrator_queue"))
    ).fetchone()
    assert row is not None
    assert before - 50 <= row[0] <= db_now_ms(admin) + 50


async def test_timer_visibility_is_the_runtime_instant(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    due = now_ms() + 60_000
    await enqueue(pg_provider, TimerElapsed(instance_id="a", execution_id=1, source_id=2, fire_at_ms=due))
    row = admin.execute(
        sql.SQL("SELECT visible_at_ms FROM {}").format(table(pg_provider, "orchestrator_queue"))
    ).fetchone()
    assert row == (due,)
    assert await pg_provider.fetch_orchestration_items(1, LEASE) == []


async def test_fetch_takes_oldest_visibility_first(pg_provider: PostgresProvider) -> None:
    # A timer that became due in the past is older work than a message enqueued just now.
    await enqueue(pg_provider, start("new"))
    await enqueue(
        pg_provider,
        TimerElapsed(instance_id="due", execution_id=1, source_id=2, fire_at_ms=now_ms() - 60_000),
    )
    items = await pg_provider.fetch_orchestration_items(2, LEASE)
    assert [i.instance_id for i in items] == ["due", "new"]


async def test_fetch_skips_locked_instances_and_keeps_looking(pg_provider: PostgresProvider) -> None:
    # Many messages of locked instances ahead of the eligible one must not hide it.
    await enqueue(pg_provider, *(start(f"busy{k}") for k in range(30)))
    held = await pg_provider.fetch_orchestration_items(30, LEASE)
    assert len(held) == 30
    await enqueue(pg_provider, *(event(f"busy{k}") for k in range(30) for _ in range(3)))
    await enqueue(pg_provider, start("free"))
    [item] = await pg_provider.fetch_orchestration_items(5, LEASE)
    assert item.instance_id == "free"


async def test_lock_lost_between_scan_and_tagging_is_released(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any], pg_dsn: str
) -> None:
    """A fetch whose instance's messages vanish before it tags them returns nothing and keeps no lock."""
    await enqueue(pg_provider, start("a"))
    deleted = threading.Event()

    def delete_in_a_slow_transaction() -> None:
        with psycopg.connect(pg_dsn) as conn, conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {}").format(table(pg_provider, "orchestrator_queue")))
            deleted.set()
            # The fetch's tagging now waits on these row locks; commit after it has scanned.
            conn.execute("SELECT pg_sleep(0.5)")

    worker = threading.Thread(target=delete_in_a_slow_transaction)
    worker.start()
    await asyncio.to_thread(deleted.wait, 5)
    started = time.monotonic()
    items = await pg_provider.fetch_orchestration_items(1, LEASE)
    waited = time.monotonic() - started
    await asyncio.to_thread(worker.join, 5)
    assert items == []
    assert waited > 0.3, "the fetch should have waited on the deleting transaction (path not exercised)"
    assert count(admin, pg_provider, "instance_locks") == 0


@pytest.mark.parametrize("round_", range(3))
async def test_racing_fetchers_on_separate_pools_claim_each_instance_once(
    make_provider: Any, round_: int
) -> None:
    providers = [await make_provider(max_pool_size=3) for _ in range(3)]
    instances = [f"i{k}" for k in range(120)]
    await enqueue(providers[0], *(start(i) for i in instances))
    claims: Counter[str] = Counter()

    async def fetcher(p: PostgresProvider) -> None:
        idle = 0
        while idle < 3:
            items = await p.fetch_orchestration_items(random.choice([1, 3, 8]), LEASE)
            if not items:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            claims.update(i.instance_id for i in items)
            errors = await p.ack_orchestration_items([first_ack(i) for i in items])
            assert errors == [None] * len(items)

    await asyncio.gather(*(fetcher(p) for p in providers for _ in range(4)))
    assert claims == Counter(instances)


async def test_racing_workers_on_separate_pools_lease_each_item_once(make_provider: Any) -> None:
    providers = [await make_provider(max_pool_size=3) for _ in range(3)]
    await enqueue(providers[0], *(start(f"i{k}") for k in range(40)))
    items = await providers[0].fetch_orchestration_items(40, LEASE)
    assert (
        await providers[0].ack_orchestration_items([first_ack(i, activities=5) for i in items]) == [None] * 40
    )
    leased: Counter[tuple[str, int]] = Counter()

    async def worker(p: PostgresProvider) -> None:
        idle = 0
        while idle < 3:
            leases = await p.fetch_work_items(random.choice([1, 4, 10]), LEASE)
            if not leases:
                idle += 1
                await asyncio.sleep(0.01)
                continue
            idle = 0
            leased.update((lease.ref.instance_id, lease.ref.activity_id) for lease in leases)
            acks = [
                WorkItemAck(
                    lock_token=lease.lock_token,
                    completion=ActivityResult(
                        instance_id=lease.ref.instance_id,
                        execution_id=1,
                        source_id=lease.ref.activity_id,
                        result="1",
                    ),
                )
                for lease in leases
            ]
            assert await p.ack_work_items(acks) == [None] * len(acks)

    await asyncio.gather(*(worker(p) for p in providers for _ in range(4)))
    assert len(leased) == 200
    assert set(leased.values()) == {1}


async def test_ping_pong_between_instances_under_concurrency(
    make_provider: Any, admin: psycopg.Connection[Any]
) -> None:
    """Acks that send messages to other instances, racing fetches on three pools: no message is
    lost or handled twice, and no deadlock surfaces as an error."""
    providers = [await make_provider(max_pool_size=3) for _ in range(3)]
    n_instances, hops = 20, 300
    await enqueue(providers[0], *(start(f"p{k}") for k in range(n_instances)))
    first = await providers[0].fetch_orchestration_items(n_instances, LEASE)
    assert await providers[0].ack_orchestration_items([first_ack(i) for i in first]) == [None] * n_instances
    await enqueue(
        providers[0], *(RaiseEvent(instance_id=f"p{k}", name="hop", data=str(k)) for k in range(hops))
    )
    seen: Counter[str] = Counter()

    async def loop(p: PostgresProvider) -> None:
        idle = 0
        while idle < 5:
            items = await p.fetch_orchestration_items(4, LEASE)
            if not items:
                idle += 1
                await asyncio.sleep(0.02)
                continue
            idle = 0
            acks = []
            for item in items:
                forwards = []
                for message in item.messages:
                    assert isinstance(message, RaiseEvent)
                    seen[message.data] += 1
                    if not message.data.endswith("/fwd"):  # forward once, to a random instance
                        target = f"p{random.randrange(n_instances)}"
                        forwards.append(
                            RaiseEvent(instance_id=target, name="hop", data=f"{message.data}/fwd")
                        )
                acks.append(empty_ack(item, orchestrator_items=forwards))
            assert await p.ack_orchestration_items(acks) == [None] * len(acks)

    await asyncio.gather(*(loop(p) for p in providers for _ in range(3)))
    assert count(admin, providers[0], "orchestrator_queue") == 0
    assert seen == Counter({**{str(k): 1 for k in range(hops)}, **{f"{k}/fwd": 1 for k in range(hops)}})


async def test_batch_ack_reports_each_failure_in_its_slot(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    await enqueue(pg_provider, *(start(f"i{k}") for k in range(4)))
    items = sorted(await pg_provider.fetch_orchestration_items(4, LEASE), key=lambda i: i.instance_id)
    good0 = first_ack(items[0], activities=1)
    duplicate = first_ack(items[1])
    duplicate.history = [*duplicate.history, duplicate.history[0]]  # event id 1 twice
    stale = OrchestrationAck(lock_token="not-a-token", instance_id="i2", execution_id=1, name="wf")
    good3 = first_ack(items[3])
    results = await pg_provider.ack_orchestration_items([good3, duplicate, stale, good0])
    assert results[0] is None and results[3] is None
    assert (
        isinstance(results[1], ProviderError)
        and not results[1].retryable
        and "duplicate" in results[1].message
    )
    assert isinstance(results[2], ProviderError) and not results[2].retryable
    assert count(admin, pg_provider, "instances") == 2
    assert count(admin, pg_provider, "worker_queue") == 1
    # The failed ack kept its lock and messages.
    assert count(admin, pg_provider, "instance_locks", "instance_id = 'i1'") == 1
    assert count(admin, pg_provider, "orchestrator_queue", "instance_id = 'i1'") == 1


async def test_empty_batches_are_no_ops(pg_provider: PostgresProvider) -> None:
    assert await pg_provider.ack_orchestration_items([]) == []
    assert await pg_provider.ack_work_items([]) == []
    assert await pg_provider.renew_work_item_locks([], LEASE) == []
    assert await pg_provider.fetch_orchestration_items(0, LEASE) == []
    assert await pg_provider.fetch_work_items(0, LEASE) == []
    await pg_provider.enqueue_orchestrator_messages([])


async def test_malformed_work_tokens_are_lost_locks(pg_provider: PostgresProvider) -> None:
    for token in ("", "abc", ":x", "12", "-1:x"):
        [error] = await pg_provider.ack_work_items([WorkItemAck(lock_token=token, completion=None)])
        assert isinstance(error, ProviderError) and not error.retryable
        with pytest.raises(ProviderError) as raised:
            await pg_provider.abandon_work_item(token)
        assert not raised.value.retryable
    assert await pg_provider.renew_work_item_locks(["", "12", "x:y"], LEASE) == [False, False, False]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
async def test_invalid_durations_are_rejected(pg_provider: PostgresProvider, value: float) -> None:
    with pytest.raises(ProviderError) as raised:
        await pg_provider.fetch_orchestration_items(1, value)
    assert not raised.value.retryable
    if value != 0.0:
        with pytest.raises(ProviderError):
            await pg_provider.abandon_orchestration_item("x", delay=value)


async def test_statements_are_prepared_and_reused(make_provider: Any) -> None:
    """After a few runs psycopg prepares the hot statements (no re-parse per call)."""
    pg_provider = await make_provider(min_pool_size=1, max_pool_size=1)
    for _ in range(8):
        await enqueue(pg_provider, start("a"))
        [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
        await pg_provider.abandon_orchestration_item(item.lock_token)
    pool = pg_provider._pool
    assert pool is not None
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
        row = await cursor.fetchone()
    assert row is not None and row[0] >= 1


async def test_concurrent_enqueues_are_coalesced(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    await asyncio.gather(
        *(pg_provider.enqueue_orchestrator_messages([start(f"c{k}"), event(f"c{k}")]) for k in range(300))
    )
    assert pg_provider._enqueuer.batches < 100
    assert count(admin, pg_provider, "orchestrator_queue") == 600
    # Each call's messages keep their order.
    items = await pg_provider.fetch_orchestration_items(300, LEASE)
    assert len(items) == 300
    assert all([type(m).__name__ for m in i.messages] == ["StartOrchestration", "RaiseEvent"] for i in items)


async def test_a_failing_enqueue_does_not_fail_the_calls_coalesced_with_it(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    bad = start("nul\x00byte")  # PostgreSQL text cannot hold NUL: a permanent error for this call
    calls = [pg_provider.enqueue_orchestrator_messages([start(f"g{k}")]) for k in range(20)]
    calls.insert(10, pg_provider.enqueue_orchestrator_messages([bad]))
    results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in results if r is not None]
    assert len(errors) == 1
    assert isinstance(errors[0], ProviderError) and not errors[0].retryable
    assert results[10] is errors[0]
    assert count(admin, pg_provider, "orchestrator_queue") == 20


async def test_a_caller_cancelled_before_its_batch_is_sent_enqueues_nothing(
    pg_provider: PostgresProvider, admin: psycopg.Connection[Any]
) -> None:
    first = [
        asyncio.ensure_future(pg_provider.enqueue_orchestrator_messages([start(f"f{k}")])) for k in range(2)
    ]
    await asyncio.sleep(0)  # both in flight (max_in_flight=2); the next one queues
    queued = asyncio.ensure_future(pg_provider.enqueue_orchestrator_messages([start("cancelled")]))
    await asyncio.sleep(0)
    queued.cancel()
    await asyncio.gather(*first)
    with pytest.raises(asyncio.CancelledError):
        await queued
    await asyncio.sleep(0.05)
    assert count(admin, pg_provider, "orchestrator_queue", "instance_id = 'cancelled'") == 0


async def test_concurrent_instance_reads_are_coalesced(pg_provider: PostgresProvider) -> None:
    await enqueue(pg_provider, *(start(f"r{k}") for k in range(5)))
    items = await pg_provider.fetch_orchestration_items(5, LEASE)
    assert await pg_provider.ack_orchestration_items([first_ack(i) for i in items]) == [None] * 5
    before = pg_provider._instance_reader.batches
    ids = [f"r{k % 7}" for k in range(200)]  # r5 and r6 do not exist; ids repeat
    infos = await asyncio.gather(*(pg_provider.get_instance(i) for i in ids))
    assert pg_provider._instance_reader.batches - before < 50
    for instance_id, info in zip(ids, infos, strict=True):
        if instance_id in ("r5", "r6"):
            assert info is None
        else:
            assert info is not None and info.instance_id == instance_id and info.status == "running"
