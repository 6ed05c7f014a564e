"""In-process wake-ups: dispatchers and clients return promptly when this provider produced work."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from pathlib import Path

from sqlite_support import (
    LOCK,
    ack_for,
    activity,
    create_instance,
    fetch_one,
    now_ms,
    raise_event,
    result,
    scheduled,
    start,
    started,
    timer,
)

from perdure.provider import WorkItemAck
from perdure_sqlite import SqliteProvider

FAST = 0.25  # a wake-up must arrive well within this


async def _elapsed(awaitable: Awaitable[None]) -> float:
    began = time.perf_counter()
    await awaitable
    return time.perf_counter() - began


async def _drain(db: SqliteProvider) -> None:
    """Consume any sticky wake-up left by earlier setup."""
    await db.wait_for_work("orchestrator", 0)
    await db.wait_for_work("worker", 0)


async def test_enqueue_wakes_a_waiting_orchestration_dispatcher(db: SqliteProvider) -> None:
    await _drain(db)
    waiter = asyncio.create_task(_elapsed(db.wait_for_work("orchestrator", 10)))
    await asyncio.sleep(0.05)
    await db.enqueue_orchestrator_messages([start("a")])
    assert await waiter < 0.05 + FAST


async def test_work_produced_while_nobody_waits_is_not_missed(db: SqliteProvider) -> None:
    await _drain(db)
    await db.enqueue_orchestrator_messages([start("a")])
    assert await _elapsed(db.wait_for_work("orchestrator", 10)) < FAST


async def test_wait_times_out_when_nothing_happens(db: SqliteProvider) -> None:
    await _drain(db)
    took = await _elapsed(db.wait_for_work("worker", 0.2))
    assert 0.15 < took < 0.2 + FAST


async def test_ack_with_activities_wakes_the_worker_dispatcher(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await _drain(db)
    waiter = asyncio.create_task(_elapsed(db.wait_for_work("worker", 10)))
    await asyncio.sleep(0.05)
    await db.ack_orchestration_items(
        [ack_for(item, history=[started(), scheduled(2)], worker_items=[activity("a", 2)])]
    )
    assert await waiter < 0.05 + FAST


async def test_worker_ack_wakes_the_orchestration_dispatcher(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    await _drain(db)
    waiter = asyncio.create_task(_elapsed(db.wait_for_work("orchestrator", 10)))
    await asyncio.sleep(0.05)
    await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2))])
    assert await waiter < 0.05 + FAST


async def test_timer_wakes_the_dispatcher_when_it_comes_due(db: SqliteProvider) -> None:
    await _drain(db)
    due = now_ms() + 300
    await db.enqueue_orchestrator_messages([timer("a", due)])
    took = await _elapsed(db.wait_for_work("orchestrator", 10))
    assert 0.25 < took < 0.3 + FAST
    assert (await fetch_one(db)).instance_id == "a"


async def test_a_timer_set_while_waiting_shortens_the_wait(db: SqliteProvider) -> None:
    await _drain(db)
    waiter = asyncio.create_task(_elapsed(db.wait_for_work("orchestrator", 10)))
    await asyncio.sleep(0.05)
    await db.enqueue_orchestrator_messages([timer("a", now_ms() + 200)])
    assert 0.2 < await waiter < 0.25 + FAST


async def test_timers_stored_by_others_are_found_by_the_next_fetch(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SqliteProvider(path) as other, SqliteProvider(path) as db:
        await other.enqueue_orchestrator_messages([timer("a", now_ms() + 300), timer("b", now_ms() + 60_000)])
        assert await db.fetch_orchestration_items(5, LOCK) == []  # learns the earliest due time
        await _drain(db)
        took = await _elapsed(db.wait_for_work("orchestrator", 10))
        assert 0.2 < took < 0.3 + FAST
        assert (await fetch_one(db)).instance_id == "a"


async def test_abandon_delay_wakes_when_it_ends(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token, delay=0.3)
    await _drain(db)
    took = await _elapsed(db.wait_for_work("orchestrator", 10))
    assert 0.25 < took < 0.3 + FAST


async def test_worker_abandon_delay_wakes_when_it_ends(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    await db.abandon_work_item(lease.lock_token, delay=0.3)
    await _drain(db)
    took = await _elapsed(db.wait_for_work("worker", 10))
    assert 0.25 < took < 0.3 + FAST


async def test_every_waiter_wakes_when_delayed_work_comes_due(db: SqliteProvider) -> None:
    # Two runtimes on one provider both wait; the first to see the due time must not swallow it,
    # or the other sleeps a whole poll interval and can lose every race for a re-delayed item.
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    await db.abandon_work_item(lease.lock_token, delay=0.3)
    await _drain(db)
    waits = [asyncio.ensure_future(_elapsed(db.wait_for_work("worker", 10))) for _ in range(3)]
    took = await asyncio.wait_for(asyncio.gather(*waits), 5)
    assert all(0.25 < t < 0.3 + FAST for t in took), took


async def test_instance_change_wakes_a_waiting_client(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    assert await db.get_instance("a") is not None
    waiter = asyncio.create_task(_elapsed(db.wait_for_instance_change("a", 10)))
    await asyncio.sleep(0.05)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    await asyncio.sleep(0.05)
    assert not waiter.done()  # an enqueue does not change the instance
    item = await fetch_one(db)
    await db.ack_orchestration_items([ack_for(item, status="completed", output='"x"')])
    assert await waiter < 0.1 + FAST


async def test_a_change_between_read_and_wait_is_not_missed(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    info = await db.get_instance("a")
    assert info is not None
    assert info.status == "running"
    await db.ack_orchestration_items([ack_for(item, status="completed", output='"x"')])
    assert await _elapsed(db.wait_for_instance_change("a", 10)) < FAST
    # Having returned once, the next wait sleeps until a new change (or its timeout).
    assert await _elapsed(db.wait_for_instance_change("a", 0.2)) > 0.15


async def test_an_unrelated_instance_does_not_wake_the_client(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.get_instance("a")
    waiter = asyncio.create_task(_elapsed(db.wait_for_instance_change("a", 0.3)))
    await create_instance(db, "b")
    assert await waiter > 0.25


async def test_custom_status_reads_also_arm_the_watch(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    assert await db.get_custom_status("a", 0) is None
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    await db.ack_orchestration_items([ack_for(item, custom_status='"half"', custom_status_changed=True)])
    assert await _elapsed(db.wait_for_instance_change("a", 10)) < FAST


async def test_waiters_on_another_event_loop_are_woken(db: SqliteProvider) -> None:
    await _drain(db)
    took: list[float] = []
    ready = threading.Event()

    def other_loop() -> None:
        async def wait() -> None:
            ready.set()
            took.append(await _elapsed(db.wait_for_work("orchestrator", 10)))

        asyncio.run(wait())

    thread = threading.Thread(target=other_loop)
    thread.start()
    await asyncio.to_thread(ready.wait)
    await asyncio.sleep(0.05)
    await db.enqueue_orchestrator_messages([start("a")])
    await asyncio.to_thread(thread.join, 5)
    assert took
    assert took[0] < 0.05 + FAST


async def test_close_wakes_every_waiter(tmp_path: Path) -> None:
    db = SqliteProvider(tmp_path / "x.db")
    await db.open()
    await _drain(db)
    waiters = [
        asyncio.create_task(_elapsed(db.wait_for_work("orchestrator", 10))),
        asyncio.create_task(_elapsed(db.wait_for_work("worker", 10))),
        asyncio.create_task(_elapsed(db.wait_for_instance_change("a", 10))),
    ]
    await asyncio.sleep(0.05)
    await db.close()
    assert all(t < 0.05 + FAST for t in await asyncio.gather(*waiters))
