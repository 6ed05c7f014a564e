"""Unit tests of perdure.testing.InMemoryProvider.

The full contract is checked by the conformance suite (provider_tests/); these tests walk one
orchestration through the provider the way the runtime will, and pin the in-process wake-ups.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from perdure.history import (
    ActivityCompleted,
    ActivityExecute,
    ActivityRef,
    ActivityResult,
    ActivityScheduled,
    OrchestrationCompleted,
    OrchestrationStarted,
    RaiseEvent,
    StartOrchestration,
    TimerElapsed,
)
from perdure.provider import OrchestrationAck, ProviderError, WorkItemAck
from perdure.testing import InMemoryProvider

LEASE = 30.0


def now_ms() -> int:
    return int(time.time() * 1000)


async def start(provider: InMemoryProvider, instance_id: str = "i1") -> None:
    await provider.enqueue_orchestrator_messages(
        [StartOrchestration(instance_id=instance_id, name="o", input="1")]
    )
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    started = OrchestrationStarted(event_id=1, timestamp_ms=now_ms(), name="o", version=None, input="1")
    ack = OrchestrationAck(item.lock_token, instance_id, 1, "o", history=[started], status="running")
    assert await provider.ack_orchestration_items([ack]) == [None]


async def test_one_orchestration_end_to_end() -> None:
    provider = InMemoryProvider()
    await start(provider)

    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="go", data="null")])
    [item] = await provider.fetch_orchestration_items(10, LEASE)
    assert item.instance is not None
    assert item.instance.last_event_id == 1
    activity = ActivityExecute(instance_id="i1", execution_id=1, activity_id=2, name="a", input='"x"')
    scheduled = ActivityScheduled(event_id=2, timestamp_ms=now_ms(), name="a", input='"x"')
    ack = OrchestrationAck(item.lock_token, "i1", 1, "o", history=[scheduled], worker_items=[activity])
    assert await provider.ack_orchestration_items([ack]) == [None]

    [lease] = await provider.fetch_work_items(10, LEASE)
    assert lease.item == activity
    assert lease.ref == ActivityRef("i1", 1, 2)
    assert lease.attempt_count == 1
    result = ActivityResult(instance_id="i1", execution_id=1, source_id=2, result='"y"')
    assert await provider.ack_work_items([WorkItemAck(lease.lock_token, result)]) == [None]

    [item] = await provider.fetch_orchestration_items(10, LEASE)
    assert item.messages == [result]
    done = [
        ActivityCompleted(event_id=3, timestamp_ms=now_ms(), source_id=2, result='"y"'),
        OrchestrationCompleted(event_id=4, timestamp_ms=now_ms(), output='"y"'),
    ]
    ack = OrchestrationAck(item.lock_token, "i1", 1, "o", history=done, status="completed", output='"y"')
    assert await provider.ack_orchestration_items([ack]) == [None]

    info = await provider.get_instance("i1")
    assert info is not None
    assert (info.status, info.output, info.last_event_id) == ("completed", '"y"', 4)
    assert [e.event_id for e in await provider.read_history("i1")] == [1, 2, 3, 4]
    assert await provider.fetch_orchestration_items(10, LEASE) == []
    assert await provider.fetch_work_items(10, LEASE) == []


async def test_enqueue_does_not_create_the_instance() -> None:
    provider = InMemoryProvider()
    await provider.enqueue_orchestrator_messages([StartOrchestration(instance_id="i1", name="o", input="1")])
    assert await provider.get_instance("i1") is None
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    assert item.instance is None


async def test_messages_arriving_during_the_lock_survive_the_ack() -> None:
    provider = InMemoryProvider()
    await start(provider)
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="a", data="1")])
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    late = RaiseEvent(instance_id="i1", name="b", data="2")
    await provider.enqueue_orchestrator_messages([late])
    assert await provider.ack_orchestration_items([OrchestrationAck(item.lock_token, "i1", 1, "o")]) == [None]
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    assert item.messages == [late]


async def test_duplicate_event_id_changes_nothing() -> None:
    provider = InMemoryProvider()
    await start(provider)
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="a", data="1")])
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    dup = OrchestrationStarted(event_id=1, timestamp_ms=0, name="x", version=None, input="2")
    activity = ActivityExecute(instance_id="i1", execution_id=1, activity_id=2, name="a", input="1")
    ack = OrchestrationAck(
        item.lock_token, "i1", 1, "o", history=[dup], worker_items=[activity], status="failed"
    )
    [error] = await provider.ack_orchestration_items([ack])
    assert isinstance(error, ProviderError)
    assert not error.retryable
    info = await provider.get_instance("i1")
    assert info is not None
    assert info.status == "running"
    assert await provider.fetch_work_items(10, LEASE) == []
    await provider.renew_orchestration_lock(item.lock_token, LEASE)  # the lock is still held


async def test_lease_lapses_on_the_wall_clock() -> None:
    provider = InMemoryProvider()
    await provider.enqueue_orchestrator_messages([StartOrchestration(instance_id="i1", name="o", input="1")])
    [first] = await provider.fetch_orchestration_items(1, 0.05)
    assert await provider.fetch_orchestration_items(1, LEASE) == []
    await asyncio.sleep(0.1)
    [second] = await provider.fetch_orchestration_items(1, LEASE)
    assert second.attempt_count == 2
    with pytest.raises(ProviderError):
        await provider.renew_orchestration_lock(first.lock_token, LEASE)


async def test_wait_for_work_wakes_on_enqueue() -> None:
    provider = InMemoryProvider()
    waiter = asyncio.create_task(provider.wait_for_work("orchestrator", 10.0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await provider.enqueue_orchestrator_messages([StartOrchestration(instance_id="i1", name="o", input="1")])
    await asyncio.wait_for(waiter, 1.0)


async def test_wait_for_work_wakes_when_a_timer_becomes_due() -> None:
    provider = InMemoryProvider()
    fire_at = now_ms() + 100
    await provider.enqueue_orchestrator_messages(
        [TimerElapsed(instance_id="i1", execution_id=1, source_id=2, fire_at_ms=fire_at)]
    )
    started = time.monotonic()
    await provider.wait_for_work("orchestrator", 10.0)
    assert time.monotonic() - started < 1.0
    assert len(await provider.fetch_orchestration_items(1, LEASE)) == 1


async def test_wait_for_work_returns_at_once_when_work_is_waiting() -> None:
    provider = InMemoryProvider()
    await provider.enqueue_orchestrator_messages([StartOrchestration(instance_id="i1", name="o", input="1")])
    await asyncio.wait_for(provider.wait_for_work("orchestrator", 10.0), 0.5)


async def test_wait_for_work_sleeps_while_the_only_work_is_locked() -> None:
    provider = InMemoryProvider()
    await provider.enqueue_orchestrator_messages([StartOrchestration(instance_id="i1", name="o", input="1")])
    await provider.fetch_orchestration_items(1, LEASE)
    started = time.monotonic()
    await provider.wait_for_work("orchestrator", 0.1)
    assert time.monotonic() - started >= 0.09


async def test_wait_for_work_wakes_the_worker_queue_on_an_ack() -> None:
    provider = InMemoryProvider()
    await start(provider)
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="a", data="1")])
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    waiter = asyncio.create_task(provider.wait_for_work("worker", 10.0))
    await asyncio.sleep(0.01)
    activity = ActivityExecute(instance_id="i1", execution_id=1, activity_id=2, name="a", input="1")
    await provider.ack_orchestration_items(
        [OrchestrationAck(item.lock_token, "i1", 1, "o", worker_items=[activity])]
    )
    await asyncio.wait_for(waiter, 1.0)


async def test_wait_for_instance_change_wakes_on_an_ack_of_that_instance_only() -> None:
    provider = InMemoryProvider()
    await start(provider, "i1")
    await start(provider, "i2")
    waiter = asyncio.create_task(provider.wait_for_instance_change("i1", 10.0))
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i2", name="a", data="1")])
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    await provider.ack_orchestration_items([OrchestrationAck(item.lock_token, "i2", 1, "o")])
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="a", data="1")])
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    ack = OrchestrationAck(item.lock_token, "i1", 1, "o", custom_status_changed=True, custom_status="s")
    await provider.ack_orchestration_items([ack])
    await asyncio.wait_for(waiter, 1.0)
    assert await provider.get_custom_status("i1", 0) == ("s", 1)


async def test_test_hooks_corrupt_and_count() -> None:
    provider = InMemoryProvider()
    await start(provider)
    provider.corrupt_history("i1")
    with pytest.raises(ProviderError) as raised:
        await provider.read_history("i1")
    assert not raised.value.retryable
    await provider.enqueue_orchestrator_messages([RaiseEvent(instance_id="i1", name="a", data="1")])
    provider.corrupt_queued_messages("i1")
    [item] = await provider.fetch_orchestration_items(1, LEASE)
    assert item.messages == []
    assert len(item.bad_messages) == 1
    assert provider.stored_attempt_count("i1") == 1
