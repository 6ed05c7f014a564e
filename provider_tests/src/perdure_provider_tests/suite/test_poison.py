"""Poison: attempt counts rise on every fetch, per message, and drive poison handling.

Only an abandon with ``ignore_attempt`` takes a fetch back, and never below zero.
"""

from __future__ import annotations

import asyncio

from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    QueueDriver,
    ack_for,
    ack_ok,
    both_queues,
    enqueue,
    event_message,
    fetch_one,
    fetch_work,
    requires_hook,
    schedule_activities,
    start_instance,
)


@both_queues
async def test_attempt_count_starts_at_one(provider: Provider, queue: QueueDriver) -> None:
    """The first fetch of new work reports attempt count 1."""
    await queue.put(provider, "i")
    assert (await queue.fetch_one(provider)).attempt_count == 1


@both_queues
async def test_each_fetch_counts_one_attempt(provider: Provider, queue: QueueDriver) -> None:
    """Each fetch raises the attempt count by one: a plain abandon does not take the fetch back."""
    await queue.put(provider, "i")
    counts = []
    for _ in range(3):
        handle = await queue.fetch_one(provider)
        counts.append(handle.attempt_count)
        await queue.abandon(provider, handle)
    assert counts == [1, 2, 3]


@both_queues
async def test_fetch_after_a_lapsed_lease_counts(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """A fetch that takes a lapsed lease counts as another attempt (a crashed worker never abandons)."""
    await queue.put(provider, "i")
    await queue.fetch_one(provider, provider_factory.lock_timeout)
    await asyncio.sleep(provider_factory.lock_timeout + provider_factory.timing_slack)
    assert (await queue.fetch_one(provider)).attempt_count == 2


@both_queues
async def test_ignore_attempt_takes_the_fetch_back(provider: Provider, queue: QueueDriver) -> None:
    """An abandon with ``ignore_attempt`` takes its fetch back: the next fetch reports the same count."""
    await queue.put(provider, "i")
    await queue.abandon(provider, await queue.fetch_one(provider))  # count 1, kept
    second = await queue.fetch_one(provider)
    assert second.attempt_count == 2
    await queue.abandon(provider, second, ignore_attempt=True)
    assert (await queue.fetch_one(provider)).attempt_count == 2


@requires_hook("attempt_count")
@both_queues
async def test_ignore_attempt_restores_the_stored_count(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """After an ``ignore_attempt`` abandon, the stored count is back to its value before the fetch."""
    await queue.put(provider, "i")
    assert await provider_factory.attempt_count(provider, "i") == 0
    handle = await queue.fetch_one(provider)
    assert await provider_factory.attempt_count(provider, "i") == 1
    await queue.abandon(provider, handle, ignore_attempt=True)
    assert await provider_factory.attempt_count(provider, "i") == 0


async def test_ignore_attempt_never_goes_below_zero(provider: Provider) -> None:
    """``ignore_attempt`` never takes a count below 0, not even for a message the fetch did not tag."""
    await enqueue(provider, event_message("i", '"tagged"'))
    item = await fetch_one(provider, "i")
    await enqueue(provider, event_message("i", '"untagged"'))  # arrives during the lock: count 0
    await provider.abandon_orchestration_item(item.lock_token, delay=60, ignore_attempt=True)
    untagged = await fetch_one(provider, "i")  # the tagged message is delayed
    assert untagged.messages == [event_message("i", '"untagged"')]
    assert untagged.attempt_count == 1


async def test_item_reports_the_highest_attempt_count(provider: Provider) -> None:
    """An orchestration item reports the highest attempt count among its messages."""
    await enqueue(provider, event_message("i", '"old"'))
    for _ in range(2):
        await provider.abandon_orchestration_item((await fetch_one(provider, "i")).lock_token)
    await enqueue(provider, event_message("i", '"new"'))
    item = await fetch_one(provider, "i")
    assert len(item.messages) == 2
    assert item.attempt_count == 3


async def test_attempt_counts_belong_to_messages(provider: Provider) -> None:
    """Attempt counts belong to messages: a message arriving after earlier attempts starts at 1."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i", '"troubled"'))
    await provider.abandon_orchestration_item((await fetch_one(provider, "i")).lock_token)
    item = await fetch_one(provider, "i")
    assert item.attempt_count == 2
    await ack_ok(provider, ack_for(item))
    await enqueue(provider, event_message("i", '"fresh"'))
    assert (await fetch_one(provider, "i")).attempt_count == 1


async def test_work_items_count_attempts_separately(provider: Provider) -> None:
    """Each work item counts its own attempts: refetching one does not raise another's count."""
    await schedule_activities(provider, "i", 2)
    [first] = await fetch_work(provider, 1)
    await provider.abandon_work_item(first.lock_token)
    [again] = await fetch_work(provider, 1)
    assert (again.item, again.attempt_count) == (first.item, 2)
    [other] = await fetch_work(provider, 1)
    assert other.item != first.item
    assert other.attempt_count == 1


@requires_hook("corrupt_history")
async def test_attempts_count_while_the_history_is_undecodable(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Fetches of an instance whose history cannot be decoded still count attempts, so it can reach poison."""
    await start_instance(provider, "i")
    await provider_factory.corrupt_history(provider, "i")
    await enqueue(provider, event_message("i"))
    counts = []
    for _ in range(3):
        item = await fetch_one(provider, "i")
        counts.append(item.attempt_count)
        await provider.abandon_orchestration_item(item.lock_token)
    assert counts == [1, 2, 3]
