"""Batches: several items per fetch and per ack, each ack standing alone.

Fetch and ack take several items per call so a busy runtime pays one round trip for many turns.
"""

from __future__ import annotations

import dataclasses

from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    QueueDriver,
    ack_for,
    assert_no_orchestration_work,
    assert_permanent,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    fetch_work,
    raised,
    schedule_activities,
    start_instance,
)


async def test_batch_fetch_returns_distinct_instances(provider: Provider) -> None:
    """A batch fetch returns distinct instances, each with its own token and only its own messages."""
    for n in range(3):
        for instance_id in ("a", "b", "c"):
            await enqueue(provider, event_message(instance_id, f'"{n}"'))
    items = await fetch_items(provider, 10)
    assert sorted(item.instance_id for item in items) == ["a", "b", "c"]
    assert len({item.lock_token for item in items}) == 3
    for item in items:
        assert item.messages == [event_message(item.instance_id, f'"{n}"') for n in range(3)]


async def test_batch_fetch_returns_distinct_work_items(provider: Provider) -> None:
    """A batch worker fetch returns distinct items, each with its own lease token."""
    scheduled = await schedule_activities(provider, "i", 4)
    leases = await fetch_work(provider, 10)
    assert [lease.item for lease in leases] == scheduled
    assert len({lease.lock_token for lease in leases}) == 4


@both_queues
async def test_fetch_respects_its_limit(provider: Provider, queue: QueueDriver) -> None:
    """A fetch never returns more than its limit, and returns everything eligible when the limit is larger."""
    for n in range(5):
        await queue.put(provider, f"i{n}")
    assert len(await queue.fetch(provider, 3)) == 3
    assert len(await queue.fetch(provider, 10)) == 2
    assert await queue.fetch(provider, 10) == []


@both_queues
async def test_invalid_ack_fails_alone_in_its_slot(provider: Provider, queue: QueueDriver) -> None:
    """In a batch ack each result sits in its ack's slot: an invalid ack fails there and the others commit."""
    for n in range(3):
        await queue.put(provider, f"i{n}")
    handles = await queue.fetch(provider, 3)
    assert len(handles) == 3
    bogus = dataclasses.replace(handles[1], token="not-a-token")
    results = await queue.ack(provider, [handles[0], bogus, handles[2], bogus])
    assert results[0] is None
    assert_permanent(results[1])
    assert results[2] is None
    assert_permanent(results[3])
    assert await queue.ack_one(provider, handles[1]) is None  # its lock was untouched
    assert await queue.fetch(provider) == []


async def test_duplicate_event_id_fails_alone_in_a_batch(provider: Provider) -> None:
    """A batch ack whose middle ack repeats an event id commits the acks before and after it."""
    for instance_id in ("a", "b", "c"):
        await start_instance(provider, instance_id)
    await enqueue(provider, *(event_message(instance_id) for instance_id in ("a", "b", "c")))
    items = {item.instance_id: item for item in await fetch_items(provider)}
    acks = [ack_for(items[i], history=[raised(1 if i == "b" else 2)]) for i in ("a", "b", "c")]
    results = await provider.ack_orchestration_items(acks)
    assert results[0] is None
    assert_permanent(results[1])
    assert results[2] is None
    for instance_id, expected in (("a", [1, 2]), ("b", [1]), ("c", [1, 2])):
        assert [e.event_id for e in await provider.read_history(instance_id)] == expected


@both_queues
async def test_empty_ack_batch_is_valid(provider: Provider, queue: QueueDriver) -> None:
    """An empty batch ack is valid and returns an empty list."""
    assert await queue.ack(provider, []) == []


@both_queues
async def test_two_acks_of_one_lock_in_a_batch(provider: Provider, queue: QueueDriver) -> None:
    """Two acks of the same lock in one batch: the first commits and the second fails permanently."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    first, second = await queue.ack(provider, [handle, handle])
    assert first is None
    assert_permanent(second)


async def test_batch_of_acks_commits_each_instance(provider: Provider) -> None:
    """A batch of acks for different instances commits every one: history, release, consumption."""
    for n in range(5):
        await start_instance(provider, f"i{n}")
    await enqueue(provider, *(event_message(f"i{n}") for n in range(5)))
    items = await fetch_items(provider)
    results = await provider.ack_orchestration_items([ack_for(item, history=[raised(2)]) for item in items])
    assert results == [None] * 5
    for n in range(5):
        assert [e.event_id for e in await provider.read_history(f"i{n}")] == [1, 2]
    await assert_no_orchestration_work(provider)
    await enqueue(provider, *(event_message(f"i{n}") for n in range(5)))
    assert len(await fetch_items(provider)) == 5
