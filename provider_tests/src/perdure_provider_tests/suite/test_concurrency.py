"""Concurrency: many tasks race fetches, acks and enqueues on one provider.

No unit of work is processed twice, none is lost, no fetcher comes back empty while eligible work
is left, and every race finishes in bounded time. Tasks that find no work wait with
``wait_for_work`` (a provider without wake-ups polls), never with a sleep that hopes another task
got somewhere. The number of racing tasks is the factory's ``concurrency``.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    LEASE,
    QueueDriver,
    ack_for,
    assert_permanent,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    raised,
    schedule_activities,
    start_instance,
)

#: Upper bound (seconds) for each race; generous, so only a hang or a livelock trips it.
BOUND = 30.0


async def test_racing_fetchers_lock_distinct_instances(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Racing fetchers lock distinct instances, and none returns empty while an unlocked one is left."""
    n = provider_factory.concurrency
    ids = [f"i{k}" for k in range(n)]
    await enqueue(provider, *(event_message(instance_id) for instance_id in ids))
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(*(provider.fetch_orchestration_items(1, LEASE) for _ in range(n)))
    assert [len(items) for items in results] == [1] * n
    assert sorted(items[0].instance_id for items in results) == sorted(ids)


async def test_racing_workers_lease_distinct_items(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Racing worker fetches lease distinct items, and none returns empty while an unleased one is left."""
    n = provider_factory.concurrency
    scheduled = await schedule_activities(provider, "i", n)
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(*(provider.fetch_work_items(1, LEASE) for _ in range(n)))
    assert [len(leases) for leases in results] == [1] * n
    leased = [leases[0].item for leases in results]
    assert sorted(item.activity_id for item in leased if item) == sorted(
        item.activity_id for item in scheduled
    )


@both_queues
async def test_racing_processors_handle_each_unit_once(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Tasks racing fetch-and-ack loops process every unit of work exactly once, in bounded time."""
    units = [f"u{k}" for k in range(provider_factory.concurrency * 4)]
    for key in units:
        await queue.put(provider, key)
    processed: Counter[str] = Counter()
    acked = 0

    async def process() -> None:
        nonlocal acked
        while acked < len(units):
            handles = await queue.fetch(provider, 2)
            if not handles:
                await provider.wait_for_work(queue.queue, 0.05)
                continue
            processed.update(handle.key for handle in handles)
            await asyncio.sleep(0)  # the work of the turn: other tasks run between fetch and ack
            results = await queue.ack(provider, handles)
            assert results == [None] * len(handles), f"acks failed: {results}"
            acked += len(handles)

    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(process() for _ in range(provider_factory.concurrency)))
    assert processed == Counter(units)


async def test_messages_racing_acks_are_delivered_exactly_once(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Messages enqueued while other tasks fetch and ack are each delivered exactly once, in order."""
    n = provider_factory.concurrency
    per_producer = 5
    instances = ["hot-a", "hot-b"]
    expected = [(instances[p % 2], f'"{p}-{j}"') for p in range(n) for j in range(per_producer)]
    received: list[tuple[str, str]] = []
    produced = asyncio.Event()

    async def produce(p: int) -> None:
        for j in range(per_producer):
            await enqueue(provider, event_message(instances[p % 2], f'"{p}-{j}"'))
            await asyncio.sleep(0)  # let consumers interleave

    async def produce_all() -> None:
        await asyncio.gather(*(produce(p) for p in range(n)))
        produced.set()

    async def consume() -> None:
        # Stop at the first empty fetch after the producers are done: each consumer's last fetch
        # follows its last ack, so nothing correct providers keep can be left behind.
        while True:
            items = await provider.fetch_orchestration_items(1, LEASE)
            if not items:
                if produced.is_set():
                    return
                await provider.wait_for_work("orchestrator", 0.05)
                continue
            [item] = items
            received.extend((item.instance_id, getattr(m, "data", "")) for m in item.messages)
            await asyncio.sleep(0)  # the turn: producers enqueue while the instance is locked
            [result] = await provider.ack_orchestration_items([ack_for(item)])
            assert result is None, f"ack failed: {result!r}"

    async with asyncio.timeout(BOUND):
        await asyncio.gather(produce_all(), *(consume() for _ in range(n)))
    assert sorted(received) == sorted(expected)
    for p in range(n):  # each producer's messages arrive in the order it sent them
        mine = [data for _, data in received if data.startswith(f'"{p}-')]
        assert mine == [f'"{p}-{j}"' for j in range(per_producer)]


async def test_concurrent_acks_of_different_instances_all_commit(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Acks of different instances committed concurrently all succeed, each on its own instance."""
    ids = [f"i{k}" for k in range(provider_factory.concurrency)]
    for instance_id in ids:
        await start_instance(provider, instance_id)
    await enqueue(provider, *(event_message(instance_id) for instance_id in ids))
    items = await fetch_items(provider)
    assert len(items) == len(ids)
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(
            *(
                provider.ack_orchestration_items(
                    [ack_for(item, history=[raised(2, f'"{item.instance_id}"')])]
                )
                for item in items
            )
        )
    assert results == [[None]] * len(ids)
    for instance_id in ids:
        history = await provider.read_history(instance_id)
        assert getattr(history[1], "data", None) == f'"{instance_id}"'


@both_queues
async def test_racing_acks_of_one_token_commit_once(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Of several acks racing with one token, exactly one commits; the others fail permanently."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(
            *(queue.ack_one(provider, handle) for _ in range(provider_factory.concurrency))
        )
    assert results.count(None) == 1, f"{results.count(None)} acks committed"
    for result in results:
        if result is not None:
            assert_permanent(result)


@both_queues
async def test_racing_fetchers_take_a_lapsed_lease_once(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """When a lease lapses, exactly one of several racing fetchers takes the work."""
    await queue.put(provider, "i")
    await queue.fetch_one(provider, provider_factory.lock_timeout)
    await asyncio.sleep(provider_factory.lock_timeout + provider_factory.timing_slack)
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(
            *(queue.fetch(provider, 1) for _ in range(provider_factory.concurrency))
        )
    assert sorted(len(handles) for handles in results) == [0] * (provider_factory.concurrency - 1) + [1]
