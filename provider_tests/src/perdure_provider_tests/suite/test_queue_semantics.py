"""Queue semantics: both queues are peek-lock queues, oldest work first.

Nothing is removed before its ack, delayed messages are invisible until due, and messages are
kept whatever the state of their instance.
"""

from __future__ import annotations

import asyncio

from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    QueueDriver,
    ack_for,
    ack_ok,
    ack_work_ok,
    assert_no_orchestration_work,
    assert_no_work_items,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_one_work,
    fetch_work,
    now_ms,
    result_message,
    schedule_activities,
    start_instance,
    take_turn,
    timer_message,
)


async def test_work_items_are_leased_oldest_first(provider: Provider) -> None:
    """Work items are leased oldest first, across acks and within one ack."""
    first = await schedule_activities(provider, "a", 3)
    second = await schedule_activities(provider, "b", 2)
    leased = [(await fetch_one_work(provider)).item for _ in range(5)]
    assert leased == first + second


async def test_instances_are_fetched_oldest_work_first(provider: Provider) -> None:
    """Instances are fetched oldest work first: the one with the oldest visible message comes first."""
    for instance_id in ("c", "a", "b"):
        await enqueue(provider, event_message(instance_id))
    await enqueue(provider, event_message("c", '"second for c"'))
    order = [(await fetch_one(provider)).instance_id for _ in range(3)]
    assert order == ["c", "a", "b"]


@both_queues
async def test_work_stays_until_acked(provider: Provider, queue: QueueDriver) -> None:
    """Fetching removes nothing: abandoned work is delivered again unchanged, and only the ack removes it."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    await queue.abandon(provider, handle)
    again = await queue.fetch_one(provider)
    assert (again.key, again.content) == (handle.key, handle.content)
    assert await queue.ack_one(provider, again) is None
    assert await queue.fetch(provider) == []


async def test_work_ack_deletes_the_item_and_enqueues_its_completion(provider: Provider) -> None:
    """A work ack deletes the item and enqueues its completion for its instance, atomically."""
    [scheduled] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    completion = result_message("i", scheduled.activity_id, result='"42"')
    await ack_work_ok(provider, lease, completion)
    await assert_no_work_items(provider)
    item = await fetch_one(provider, "i")
    assert item.messages == [completion]


async def test_work_ack_without_completion_enqueues_nothing(provider: Provider) -> None:
    """A work ack without a completion deletes the item and enqueues nothing."""
    await schedule_activities(provider, "i", 1)
    await ack_work_ok(provider, await fetch_one_work(provider), None)
    await assert_no_work_items(provider)
    await assert_no_orchestration_work(provider)


async def test_timer_is_invisible_until_due(provider: Provider, provider_factory: ProviderFactory) -> None:
    """A message with a future ``visible_at_ms`` (a timer) is fetched only once that time has come."""
    delay = 0.3
    timer = timer_message("i", now_ms() + int(delay * 1000))
    await enqueue(provider, timer)
    assert await fetch_items(provider) == []
    await asyncio.sleep(delay + provider_factory.timing_slack)
    assert (await fetch_one(provider, "i")).messages == [timer]


async def test_past_timer_is_visible_at_once(provider: Provider) -> None:
    """A message whose ``visible_at_ms`` has already passed is fetchable at once."""
    timer = timer_message("i", now_ms() - 60_000)
    await enqueue(provider, timer)
    assert (await fetch_one(provider, "i")).messages == [timer]


async def test_future_message_is_neither_delivered_nor_deleted(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A fetch tags only visible messages: a future message is not delivered and survives the ack."""
    delay = 0.3
    timer = timer_message("i", now_ms() + int(delay * 1000))
    await enqueue(provider, timer, event_message("i"))
    item = await fetch_one(provider, "i")
    assert item.messages == [event_message("i")]
    await ack_ok(provider, ack_for(item))
    await asyncio.sleep(delay + provider_factory.timing_slack)
    assert (await fetch_one(provider, "i")).messages == [timer]


async def test_future_message_does_not_block_other_instances(provider: Provider) -> None:
    """A future message does not hold up ready messages of other instances."""
    await enqueue(provider, timer_message("later", now_ms() + 60_000), event_message("ready"))
    assert [item.instance_id for item in await fetch_items(provider)] == ["ready"]


async def test_ack_items_are_routed_and_timed(provider: Provider, provider_factory: ProviderFactory) -> None:
    """An ack's orchestrator items go to the instance each names, visible at their ``visible_at_ms``."""
    await start_instance(provider, "i")
    delay = 0.3
    timer = timer_message("i", now_ms() + int(delay * 1000))
    await take_turn(provider, "i", orchestrator_items=[event_message("x"), timer, event_message("y")])
    assert sorted(item.instance_id for item in await fetch_items(provider)) == ["x", "y"]
    await asyncio.sleep(delay + provider_factory.timing_slack)
    assert (await fetch_one(provider, "i")).messages == [timer]


async def test_new_work_items_are_fetchable_at_once(provider: Provider) -> None:
    """Work items inserted by an ack are leasable as soon as the ack returns."""
    scheduled = await schedule_activities(provider, "i", 2)
    assert [lease.item for lease in await fetch_work(provider)] == scheduled


async def test_orphan_messages_are_kept(provider: Provider) -> None:
    """Messages for a not-yet-created instance are kept and delivered with ``instance=None``."""
    orphan = event_message("ghost", '"early"')
    await enqueue(provider, orphan)
    item = await fetch_one(provider, "ghost")
    assert item.instance is None
    assert item.messages == [orphan]
    await provider.abandon_orchestration_item(item.lock_token)
    again = await fetch_one(provider, "ghost")
    assert again.messages == [orphan]


async def test_messages_for_a_finished_instance_are_delivered(provider: Provider) -> None:
    """Messages for a completed instance are delivered like any other: providers never decide control flow."""
    await start_instance(provider, "i")
    await take_turn(provider, "i", status="completed", output='"done"')
    await enqueue(provider, event_message("i", '"too late"'))
    item = await fetch_one(provider, "i")
    assert item.messages == [event_message("i", '"too late"')]
    assert item.instance is not None
    assert item.instance.status == "completed"


@both_queues
async def test_abandon_with_delay_hides_the_work(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """Abandon with a delay hides the work for that long; then it is fetchable again."""
    delay = 0.3
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    await queue.abandon(provider, handle, delay=delay)
    assert await queue.fetch(provider) == []
    await asyncio.sleep(delay + provider_factory.timing_slack)
    assert (await queue.fetch_one(provider)).key == "i"


async def test_one_enqueue_routes_each_message(provider: Provider) -> None:
    """One enqueue call may carry messages for several instances; each goes to its own instance, in order."""
    await enqueue(provider, event_message("a", '"1"'), event_message("b", '"2"'), event_message("a", '"3"'))
    items = {item.instance_id: item.messages for item in await fetch_items(provider)}
    assert items == {
        "a": [event_message("a", '"1"'), event_message("a", '"3"')],
        "b": [event_message("b", '"2"')],
    }
