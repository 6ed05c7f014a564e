"""Orchestrator queue: instance locks, tagging, visibility, ordering, attempts, abandon."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlite_support import (
    LOCK,
    ack_for,
    create_instance,
    fetch_one,
    now_ms,
    raise_event,
    start,
    started,
    timer,
)

from perdure.history import ActivityExecute, StartOrchestration
from perdure.provider import ProviderError
from perdure_sqlite import SqliteProvider


async def test_fetch_returns_messages_of_one_instance_in_order(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a"), raise_event("a", "e1"), raise_event("a", "e2")])
    item = await fetch_one(db)
    assert item.instance_id == "a"
    assert item.instance is None
    assert item.attempt_count == 1
    assert item.bad_messages == []
    assert [type(m).__name__ for m in item.messages] == ["StartOrchestration", "RaiseEvent", "RaiseEvent"]
    assert [getattr(m, "name", None) for m in item.messages[1:]] == ["e1", "e2"]


async def test_fetch_on_empty_queue_returns_nothing(db: SqliteProvider) -> None:
    assert await db.fetch_orchestration_items(10, LOCK) == []
    assert await db.fetch_orchestration_items(0, LOCK) == []


async def test_enqueue_never_creates_an_instance(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    await fetch_one(db)
    assert await db.get_instance("a") is None


async def test_oldest_work_first_across_instances(db: SqliteProvider) -> None:
    for name in ["c", "a", "b"]:
        await db.enqueue_orchestrator_messages([start(name)])
    first = await db.fetch_orchestration_items(1, LOCK)
    rest = await db.fetch_orchestration_items(5, LOCK)
    assert [i.instance_id for i in first + rest] == ["c", "a", "b"]


async def test_limit_counts_distinct_instances(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages(
        [start("a"), raise_event("a"), raise_event("a"), start("b"), start("c")]
    )
    items = await db.fetch_orchestration_items(2, LOCK)
    assert [i.instance_id for i in items] == ["a", "b"]
    assert len(items[0].messages) == 3


async def test_locked_instance_is_not_fetched_twice(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    await fetch_one(db)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    assert await db.fetch_orchestration_items(10, LOCK) == []


async def test_messages_arriving_during_the_lock_survive_the_ack(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.enqueue_orchestrator_messages([raise_event("a", "late")])
    assert await db.ack_orchestration_items([ack_for(item, history=[started()])]) == [None]
    again = await fetch_one(db)
    assert [getattr(m, "name", None) for m in again.messages] == ["late"]
    assert again.instance is not None
    assert again.instance.last_event_id == 1


async def test_lock_tokens_are_unique(db: SqliteProvider) -> None:
    tokens = set()
    for n in range(20):
        await db.enqueue_orchestrator_messages([start(f"i{n}")])
    for _ in range(4):
        for item in await db.fetch_orchestration_items(5, LOCK):
            tokens.add(item.lock_token)
    assert len(tokens) == 20


async def test_expired_lock_can_be_taken_and_old_token_is_invalid(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    first = await fetch_one(db, lock_timeout=0.05)
    await asyncio.sleep(0.1)
    second = await fetch_one(db)
    assert second.lock_token != first.lock_token
    assert second.attempt_count == 2
    [error] = await db.ack_orchestration_items([ack_for(first, history=[started()])])
    assert error is not None
    assert not error.retryable
    with pytest.raises(ProviderError) as info:
        await db.renew_orchestration_lock(first.lock_token, LOCK)
    assert not info.value.retryable
    assert await db.ack_orchestration_items([ack_for(second, history=[started()])]) == [None]


async def test_renew_extends_the_lock(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db, lock_timeout=0.15)
    await db.renew_orchestration_lock(item.lock_token, 5.0)
    await asyncio.sleep(0.25)
    assert await db.fetch_orchestration_items(10, LOCK) == []
    assert await db.ack_orchestration_items([ack_for(item, history=[started()])]) == [None]


async def test_renew_after_expiry_fails_permanently(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db, lock_timeout=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(ProviderError) as info:
        await db.renew_orchestration_lock(item.lock_token, LOCK)
    assert not info.value.retryable


async def test_timer_is_invisible_until_due(db: SqliteProvider) -> None:
    due = now_ms() + 300
    await db.enqueue_orchestrator_messages([timer("a", due)])
    assert await db.fetch_orchestration_items(10, LOCK) == []
    await asyncio.sleep(max(0.0, (due - now_ms()) / 1000) + 0.02)
    item = await fetch_one(db)
    assert item.messages[0].visible_at_ms == due


async def test_future_message_does_not_block_ready_work(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages(
        [timer("a", now_ms() + 60_000), start("b"), raise_event("a", "now")]
    )
    items = await db.fetch_orchestration_items(10, LOCK)
    by_id = {i.instance_id: i for i in items}
    assert set(by_id) == {"a", "b"}
    assert [type(m).__name__ for m in by_id["a"].messages] == ["RaiseEvent"]
    # The timer was not tagged, so the ack leaves it queued.
    assert await db.ack_orchestration_items([ack_for(by_id["a"])]) == [None]
    rows = await db._execute("SELECT count(*) FROM orchestrator_queue WHERE instance_id = 'a'")
    assert rows == [(1,)]


async def test_attempt_count_rises_on_every_fetch_and_reports_the_maximum(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    for expected in (1, 2, 3):
        item = await fetch_one(db)
        assert item.attempt_count == expected
        await db.abandon_orchestration_item(item.lock_token)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert item.attempt_count == 4  # max over the tagged messages (the new one is at 1)


async def test_abandon_ignore_attempt_uncounts_and_never_goes_negative(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token, ignore_attempt=True)
    item = await fetch_one(db)
    assert item.attempt_count == 1
    await db.abandon_orchestration_item(item.lock_token, ignore_attempt=True)
    await db._execute("UPDATE orchestrator_queue SET attempt_count = 0")
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token, ignore_attempt=True)
    rows = await db._execute("SELECT attempt_count FROM orchestrator_queue")
    assert rows == [(0,)]


async def test_abandon_with_delay_hides_the_tagged_messages(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token, delay=0.3)
    assert await db.fetch_orchestration_items(10, LOCK) == []
    await asyncio.sleep(0.35)
    assert (await fetch_one(db)).attempt_count == 2


async def test_abandon_releases_the_lock_at_once(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token)
    again = await fetch_one(db)
    assert again.lock_token != item.lock_token


@pytest.mark.parametrize("token", ["nonsense", "o123:a", "", "w1.5"])
async def test_abandon_or_renew_with_an_invalid_token_fails_permanently(
    db: SqliteProvider, token: str
) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    await fetch_one(db)
    for call in (db.abandon_orchestration_item(token), db.renew_orchestration_lock(token, LOCK)):
        with pytest.raises(ProviderError) as info:
            await call
        assert not info.value.retryable


async def test_abandon_twice_fails_the_second_time(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.abandon_orchestration_item(item.lock_token)
    with pytest.raises(ProviderError):
        await db.abandon_orchestration_item(item.lock_token)


async def test_undecodable_messages_are_reported_and_deleted_by_the_ack(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a"), raise_event("a")])
    await db._execute(
        "UPDATE orchestrator_queue SET payload = '{not json'"
        " WHERE id = (SELECT max(id) FROM orchestrator_queue)"
    )
    await db._execute(
        "INSERT INTO orchestrator_queue (instance_id, payload, visible_at_ms, enqueued_at_ms)"
        " VALUES (?, ?, 0, 0)",
        (
            "a",
            '{"type":"ActivityExecute","instance_id":"a","execution_id":1,"activity_id":2,"name":"x","input":"1"}',
        ),
    )
    item = await fetch_one(db)
    assert [type(m) for m in item.messages] == [StartOrchestration]
    assert len(item.bad_messages) == 2
    assert "JSON" in item.bad_messages[0]
    assert ActivityExecute.TYPE in item.bad_messages[1]
    assert await db.ack_orchestration_items([ack_for(item)]) == [None]
    assert await db._execute("SELECT count(*) FROM orchestrator_queue") == [(0,)]


async def test_concurrent_fetchers_each_get_distinct_instances(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start(f"i{n}") for n in range(40)])
    batches = await asyncio.gather(*(db.fetch_orchestration_items(3, LOCK) for _ in range(20)))
    fetched = [item.instance_id for batch in batches for item in batch]
    assert sorted(fetched) == sorted(f"i{n}" for n in range(40))


async def test_instance_row_is_returned_with_the_item(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert item.instance is not None
    assert item.instance.instance_id == "a"
    assert item.instance.execution_id == 1
    assert item.instance.status == "running"


async def test_fetch_is_not_slowed_by_many_future_timers(file_db: SqliteProvider) -> None:
    far = now_ms() + 3_600_000
    await file_db.enqueue_orchestrator_messages([timer(f"t{n}", far) for n in range(5000)])
    await file_db.enqueue_orchestrator_messages([start("ready")])
    began = time.perf_counter()
    for _ in range(20):
        items = await file_db.fetch_orchestration_items(10, LOCK)
        for item in items:
            await file_db.abandon_orchestration_item(item.lock_token)
    assert time.perf_counter() - began < 1.0
