"""Lock expiry: locks are leases on the wall clock, renewable while held.

A lapsed lease may be taken by another fetcher, and its token is dead from the moment it lapses.
These tests fetch with the factory's short ``lock_timeout`` and sleep past it (plus
``timing_slack``): waiting for a lease to lapse is the behaviour under test, not a hope.
"""

from __future__ import annotations

import asyncio

from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    QueueDriver,
    assert_permanent,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_work,
    raises_permanent,
    schedule_activities,
)


async def _lapse(factory: ProviderFactory) -> None:
    await asyncio.sleep(factory.lock_timeout + factory.timing_slack)


@both_queues
async def test_lapsed_lease_can_be_taken(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Work whose lease has passed can be fetched again by another fetcher."""
    await queue.put(provider, "i")
    first = await queue.fetch_one(provider, provider_factory.lock_timeout)
    await _lapse(provider_factory)
    second = await queue.fetch_one(provider)
    assert (second.key, second.content) == (first.key, first.content)
    assert second.token != first.token


@both_queues
async def test_lease_is_not_taken_early(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """A lease is not taken by another fetcher before it has passed."""
    await queue.put(provider, "i")
    await queue.fetch_one(provider, provider_factory.lock_timeout)
    await asyncio.sleep(provider_factory.lock_timeout / 2)
    assert await queue.fetch(provider) == []


@both_queues
async def test_ack_after_the_lease_lapsed_fails(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """An ack after the lease has passed fails permanently, even if no one took the work."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider, provider_factory.lock_timeout)
    await _lapse(provider_factory)
    assert_permanent(await queue.ack_one(provider, handle))
    again = await queue.fetch_one(provider)
    assert (again.key, again.content) == (handle.key, handle.content)


@both_queues
async def test_old_token_is_dead_after_a_takeover(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """After another fetcher takes a lapsed lease, the old token fails and the new token commits."""
    await queue.put(provider, "i")
    old = await queue.fetch_one(provider, provider_factory.lock_timeout)
    await _lapse(provider_factory)
    new = await queue.fetch_one(provider)
    assert_permanent(await queue.ack_one(provider, old))
    assert not await queue.renew(provider, old, 60)
    assert await queue.ack_one(provider, new) is None


@both_queues
async def test_lapsed_lease_cannot_be_renewed(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """A lease that has passed cannot be renewed, even if no one took the work."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider, provider_factory.lock_timeout)
    await _lapse(provider_factory)
    assert not await queue.renew(provider, handle, 60)


@both_queues
async def test_renewal_extends_the_lease(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Renewal extends a held lease from now: the work outlives its first lease and the ack then commits."""
    timeout = provider_factory.lock_timeout
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider, timeout)
    await asyncio.sleep(timeout / 2)
    assert await queue.renew(provider, handle, 2 * timeout)
    await asyncio.sleep(timeout / 2 + provider_factory.timing_slack)  # past the first lease
    assert await queue.fetch(provider) == []
    assert await queue.ack_one(provider, handle) is None


@both_queues
async def test_abandon_after_the_lease_lapsed_fails(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Abandon after the lease has passed raises a permanent error."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider, provider_factory.lock_timeout)
    await _lapse(provider_factory)
    await raises_permanent(queue.abandon(provider, handle))


async def test_taking_a_lapsed_lock_tags_late_messages(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Taking a lapsed instance lock tags every visible message, including late arrivals."""
    await enqueue(provider, event_message("i", '"first"'))
    await fetch_one(provider, "i", provider_factory.lock_timeout)
    await enqueue(provider, event_message("i", '"late"'))
    await _lapse(provider_factory)
    item = await fetch_one(provider, "i")
    assert item.messages == [event_message("i", '"first"'), event_message("i", '"late"')]
    assert [i.instance_id for i in await fetch_items(provider)] == []


async def test_lease_renewal_reports_each_token(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """One renewal call judges each lease on its own: a lapsed one reports False, a held one is extended."""
    await schedule_activities(provider, "i", 2)
    [short] = await fetch_work(provider, 1, provider_factory.lock_timeout)
    [long] = await fetch_work(provider, 1, 60)
    await _lapse(provider_factory)
    assert await provider.renew_work_item_locks([short.lock_token, long.lock_token], 60) == [False, True]
