"""Locking: a fetch locks an instance, or leases a work item, exclusively.

The instance lock lives apart from the messages it tags, and an ack deletes only the messages
tagged at fetch.
"""

from __future__ import annotations

from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    QueueDriver,
    ack_for,
    ack_ok,
    ack_work_ok,
    assert_no_orchestration_work,
    assert_permanent,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_work,
    raises_permanent,
    schedule_activities,
    start_instance,
)


@both_queues
async def test_locked_work_is_not_fetched_again(provider: Provider, queue: QueueDriver) -> None:
    """Locked work (an instance or a work item) is not returned by another fetch while held."""
    await queue.put(provider, "i")
    await queue.fetch_one(provider)
    assert await queue.fetch(provider) == []


async def test_lock_tokens_are_unique(provider: Provider) -> None:
    """Every fetch issues a fresh token, unique across instances, refetches and both queues."""
    tokens: list[str] = []
    await enqueue(provider, event_message("a"), event_message("b"))
    first = await fetch_items(provider)
    tokens += [item.lock_token for item in first]
    await provider.abandon_orchestration_item(first[0].lock_token)
    tokens += [item.lock_token for item in await fetch_items(provider)]
    await ack_ok(provider, *(ack_for(item) for item in first[1:]))

    await schedule_activities(provider, "c", 3)
    leases = await fetch_work(provider)
    tokens += [lease.lock_token for lease in leases]
    await provider.abandon_work_item(leases[0].lock_token)
    tokens += [lease.lock_token for lease in await fetch_work(provider)]
    assert len(tokens) == 7
    assert len(set(tokens)) == len(tokens), f"a token was issued twice: {tokens}"


async def test_messages_arriving_during_a_lock_wait_for_its_release(provider: Provider) -> None:
    """Messages that arrive for a locked instance are not fetchable, by anyone, until the lock is released."""
    await enqueue(provider, event_message("i", '"first"'))
    item = await fetch_one(provider, "i")
    await enqueue(provider, event_message("i", '"late"'))
    assert await fetch_items(provider) == []
    await ack_ok(provider, ack_for(item))
    late = await fetch_one(provider, "i")
    assert late.messages == [event_message("i", '"late"')]


async def test_ack_deletes_only_the_tagged_messages(provider: Provider) -> None:
    """An ack deletes only the messages tagged at fetch; messages that arrived during the lock survive it."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i", '"a"'), event_message("i", '"b"'))
    item = await fetch_one(provider, "i")
    late = [event_message("i", '"c"'), event_message("i", '"d"')]
    await enqueue(provider, *late)
    await ack_ok(provider, ack_for(item))
    survivor = await fetch_one(provider, "i")
    assert survivor.messages == late


async def test_lock_does_not_block_other_instances(provider: Provider) -> None:
    """A locked instance does not hold up other instances: their messages stay fetchable."""
    await enqueue(provider, event_message("a"))
    await fetch_one(provider, "a")
    await enqueue(provider, event_message("b"), event_message("a"))
    other = await fetch_one(provider, "b")
    assert other.messages == [event_message("b")]


async def test_fetch_tags_every_visible_message_in_order(provider: Provider) -> None:
    """A fetch delivers every visible message of the instance in one item, in enqueue order."""
    messages = [event_message("i", f'"{n}"') for n in range(5)]
    await enqueue(provider, *messages[:2])
    await enqueue(provider, *messages[2:])
    item = await fetch_one(provider, "i")
    assert item.messages == messages


async def test_ack_releases_the_lock(provider: Provider) -> None:
    """After a successful ack, the instance's next message can be fetched at once."""
    await enqueue(provider, event_message("i"))
    await ack_ok(provider, ack_for(await fetch_one(provider, "i")))
    await assert_no_orchestration_work(provider)
    await enqueue(provider, event_message("i", '"next"'))
    assert (await fetch_one(provider, "i")).messages == [event_message("i", '"next"')]


@both_queues
async def test_abandon_releases_at_once(provider: Provider, queue: QueueDriver) -> None:
    """Abandon releases the lock at once: the same work is fetchable again without waiting for the lease."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    await queue.abandon(provider, handle)
    again = await queue.fetch_one(provider)
    assert (again.key, again.content) == (handle.key, handle.content)
    assert again.token != handle.token


@both_queues
async def test_token_released_by_ack_is_dead(provider: Provider, queue: QueueDriver) -> None:
    """A token released by an ack can neither abandon nor renew."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    assert await queue.ack_one(provider, handle) is None
    await raises_permanent(queue.abandon(provider, handle))
    assert not await queue.renew(provider, handle, 60)


@both_queues
async def test_token_released_by_abandon_is_dead(provider: Provider, queue: QueueDriver) -> None:
    """A token released by abandon can neither ack, abandon nor renew, even after a refetch."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    await queue.abandon(provider, handle)
    assert_permanent(await queue.ack_one(provider, handle))
    await raises_permanent(queue.abandon(provider, handle))
    assert not await queue.renew(provider, handle, 60)
    current = await queue.fetch_one(provider)
    assert_permanent(await queue.ack_one(provider, handle))
    assert await queue.ack_one(provider, current) is None


async def test_work_items_are_leased_one_by_one(provider: Provider) -> None:
    """Work items are leased one by one: leasing one leaves the instance's other items fetchable."""
    scheduled = await schedule_activities(provider, "i", 2)
    [first] = await fetch_work(provider, 1)
    [second] = await fetch_work(provider, 1)
    assert {first.item, second.item} == set(scheduled)
    assert first.lock_token != second.lock_token


async def test_work_ack_deletes_only_its_item(provider: Provider) -> None:
    """A work item's ack deletes that item only, never other items of the same instance."""
    scheduled = await schedule_activities(provider, "i", 3)
    [first] = await fetch_work(provider, 1)
    await ack_work_ok(provider, first)
    remaining = await fetch_work(provider)
    assert [lease.item for lease in remaining] == [item for item in scheduled if item != first.item]
