"""Unit tests of perdure_provider_tests.faults.FaultyProvider (wrapping InMemoryProvider)."""

from __future__ import annotations

import asyncio
import time

import pytest

from perdure.provider import OrchestrationItem, ProviderError, WorkItemAck
from perdure.testing import InMemoryProvider
from perdure_provider_tests.faults import OPERATIONS, FaultyProvider
from perdure_provider_tests.helpers import (
    ack_for,
    activity,
    enqueue,
    event_message,
    fetch_one,
    fetch_one_work,
    raised,
    result_message,
    schedule_activities,
    scheduled,
    start_instance,
)


@pytest.fixture
def faulty() -> FaultyProvider:
    return FaultyProvider(InMemoryProvider())


async def test_transparent_and_counted(faulty: FaultyProvider) -> None:
    assert faulty.name == "faulty(memory)"
    assert faulty.capabilities == faulty.inner.capabilities
    await start_instance(faulty, "i")
    assert faulty.calls["enqueue_orchestrator_messages"] == 1
    assert faulty.calls["fetch_orchestration_items"] == 1
    assert faulty.calls["ack_orchestration_items"] == 1
    assert sum(faulty.injected.values()) == 0


async def test_fail_next_fetch_raises_before_the_call(faulty: FaultyProvider) -> None:
    await enqueue(faulty, event_message("i"))
    faulty.fail_next_fetch("orchestrator")
    with pytest.raises(ProviderError) as raised_error:
        await faulty.fetch_orchestration_items(1, 60)
    assert raised_error.value.retryable
    assert raised_error.value.operation == "fetch_orchestration_items"
    item = await fetch_one(faulty, "i")  # nothing was locked by the failed fetch
    assert item.attempt_count == 1
    assert faulty.injected["fetch_orchestration_items"] == 1


async def test_fail_next_fetch_targets_one_queue(faulty: FaultyProvider) -> None:
    faulty.fail_next_fetch("worker")
    assert await faulty.fetch_orchestration_items(1, 60) == []
    with pytest.raises(ProviderError):
        await faulty.fetch_work_items(1, 60)
    assert await faulty.fetch_work_items(1, 60) == []


async def test_permanent_failures_and_times(faulty: FaultyProvider) -> None:
    faulty.fail_next("get_instance", times=2, retryable=False, message="boom")
    for _ in range(2):
        with pytest.raises(ProviderError) as raised_error:
            await faulty.get_instance("i")
        assert not raised_error.value.retryable
        assert raised_error.value.message == "boom"
    assert await faulty.get_instance("i") is None
    assert faulty.pending == 0


async def test_failed_ack_commits_nothing(faulty: FaultyProvider) -> None:
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    faulty.fail_next_ack("orchestrator")
    with pytest.raises(ProviderError):
        await faulty.ack_orchestration_items([ack_for(item, history=[raised(2)])])
    assert len(await faulty.read_history("i")) == 1
    assert await faulty.ack_orchestration_items([ack_for(item, history=[raised(2)])]) == [None]


async def test_ack_then_fail_commits_and_raises(faulty: FaultyProvider) -> None:
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    faulty.ack_then_fail("orchestrator")
    with pytest.raises(ProviderError) as raised_error:
        await faulty.ack_orchestration_items([ack_for(item, history=[raised(2)])])
    assert raised_error.value.retryable
    assert [e.event_id for e in await faulty.read_history("i")] == [1, 2]  # it did commit
    [retry] = await faulty.ack_orchestration_items([ack_for(item, history=[raised(2)])])
    assert retry is not None  # a retried ack with the spent token fails: no duplicate turn
    assert not retry.retryable


async def test_ack_then_fail_on_the_worker_queue(faulty: FaultyProvider) -> None:
    await schedule_activities(faulty, "i", 1)
    lease = await fetch_one_work(faulty)
    faulty.ack_then_fail("worker")
    with pytest.raises(ProviderError):
        await faulty.ack_work_items([WorkItemAck(lease.lock_token, event_message("i"))])
    assert (await fetch_one(faulty, "i")).messages == [event_message("i")]


async def test_delay_next(faulty: FaultyProvider) -> None:
    faulty.delay_next("get_instance", 0.1, times=1)
    start = time.monotonic()
    await faulty.get_instance("i")
    assert time.monotonic() - start >= 0.09
    start = time.monotonic()
    await faulty.get_instance("i")
    assert time.monotonic() - start < 0.09


async def test_delay_every_call_until_cleared(faulty: FaultyProvider) -> None:
    faulty.delay_next(["get_instance", "read_history"], 0.05, times=None)
    for call in (faulty.get_instance("i"), faulty.read_history("i"), faulty.get_instance("i")):
        start = time.monotonic()
        await call
        assert time.monotonic() - start >= 0.04
    faulty.clear()
    assert faulty.pending == 0


async def test_drop_connections_fails_any_operation_then_recovers(faulty: FaultyProvider) -> None:
    faulty.drop_connections(times=3)
    calls = [faulty.get_instance("i"), faulty.fetch_work_items(1, 60), faulty.wait_for_work("worker", 0)]
    for call in calls:
        with pytest.raises(ProviderError) as raised_error:
            await call
        assert raised_error.value.retryable
    assert await faulty.fetch_work_items(1, 60) == []


async def test_faults_fire_in_order(faulty: FaultyProvider) -> None:
    faulty.fail_next("get_instance", retryable=True)
    faulty.fail_next("get_instance", retryable=False)
    with pytest.raises(ProviderError) as first:
        await faulty.get_instance("i")
    with pytest.raises(ProviderError) as second:
        await faulty.get_instance("i")
    assert (first.value.retryable, second.value.retryable) == (True, False)


async def test_unknown_operation_is_rejected(faulty: FaultyProvider) -> None:
    with pytest.raises(ValueError, match="unknown operations"):
        faulty.fail_next("fetch_everything")  # type: ignore[arg-type]
    assert "fetch_orchestration_items" in OPERATIONS
    assert "open" not in OPERATIONS


async def test_wakeups_pass_through(faulty: FaultyProvider) -> None:
    await enqueue(faulty, event_message("i"))
    start = time.monotonic()
    await faulty.wait_for_work("orchestrator", 10)  # the inner provider returns at once: work waits
    assert time.monotonic() - start < 1


async def test_direct_dispatch_passes_through(faulty: FaultyProvider) -> None:
    """The wrapper declares the inner provider's direct dispatch and hands its leases and locks through."""
    assert faulty.capabilities.direct_dispatch is faulty.inner.capabilities.direct_dispatch is True
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    work = activity("i", 2)
    ack = ack_for(item, history=[scheduled(2)], worker_items=[work], lease_worker_items=1)
    [leases] = await faulty.ack_orchestration_items([ack])
    assert isinstance(leases, list)
    assert [(lease.item, lease.attempt_count) for lease in leases] == [(work, 1)]
    completion = result_message("i", 2)
    [locked] = await faulty.ack_work_items([WorkItemAck(leases[0].lock_token, completion, lock_instance=60)])
    assert isinstance(locked, OrchestrationItem)
    assert locked.messages == [completion]


async def test_ack_then_fail_loses_direct_leases_until_they_lapse(faulty: FaultyProvider) -> None:
    """A lost reply loses the leases it carried: the items wait out the lease, then are fetched again."""
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    work = activity("i", 2)
    ack = ack_for(
        item, history=[scheduled(2)], worker_items=[work], lease_worker_items=1, worker_lease_timeout=0.1
    )
    faulty.ack_then_fail("orchestrator")
    with pytest.raises(ProviderError):
        await faulty.ack_orchestration_items([ack])
    assert await faulty.fetch_work_items(10, 60) == []  # leased to a caller that never saw the lease
    await asyncio.sleep(0.15)
    again = await fetch_one_work(faulty)
    assert (again.item, again.attempt_count) == (work, 2)


async def test_ack_then_fail_loses_a_direct_lock_until_it_lapses(faulty: FaultyProvider) -> None:
    """A lost reply loses the instance it locked: the completion waits out the lock, then is fetched again."""
    await schedule_activities(faulty, "i", 1)
    lease = await fetch_one_work(faulty)
    completion = result_message("i", 2)
    faulty.ack_then_fail("worker")
    with pytest.raises(ProviderError):
        await faulty.ack_work_items([WorkItemAck(lease.lock_token, completion, lock_instance=0.1)])
    assert await faulty.fetch_orchestration_items(10, 60) == []
    await asyncio.sleep(0.15)
    again = await fetch_one(faulty, "i")
    assert (again.messages, again.attempt_count) == ([completion], 2)


async def test_ack_then_fail_with_keep_lock_leaves_the_lock_held(faulty: FaultyProvider) -> None:
    """A lost reply of an ack that kept its lock leaves the instance held by a token its caller thinks
    failed: a retry fails on the stored history (not the lock), and the lock lapses or is abandoned."""
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    work = activity("i", 2)
    ack = ack_for(
        item,
        history=[scheduled(2)],
        worker_items=[work],
        lease_worker_items=1,
        worker_lease_timeout=0.1,
        keep_lock=0.1,
    )
    faulty.ack_then_fail("orchestrator")
    with pytest.raises(ProviderError):
        await faulty.ack_orchestration_items([ack])
    [retry] = await faulty.ack_orchestration_items([ack])
    assert isinstance(retry, ProviderError) and not retry.retryable
    assert "duplicate event id" in retry.message  # the token still holds: the history refuses it
    late = event_message("i", '"late"')
    await enqueue(faulty, late)
    assert await faulty.fetch_orchestration_items(10, 60) == []  # kept for a caller that never knew
    await asyncio.sleep(0.15)
    again = await fetch_one(faulty, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)
    lease = await fetch_one_work(faulty)
    assert (lease.item, lease.attempt_count) == (work, 2)


async def test_abandon_frees_a_lock_kept_by_a_lost_reply(faulty: FaultyProvider) -> None:
    """A caller that abandons the token of an ack it believes failed frees a lock the commit kept."""
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    faulty.ack_then_fail("orchestrator")
    with pytest.raises(ProviderError):
        await faulty.ack_orchestration_items([ack_for(item, history=[raised(2)], keep_lock=60)])
    await faulty.abandon_orchestration_item(item.lock_token)
    await enqueue(faulty, event_message("i", '"late"'))
    assert (await fetch_one(faulty, "i")).messages == [event_message("i", '"late"')]


async def test_ack_then_fail_with_completed_work_items_deletes_them(faulty: FaultyProvider) -> None:
    """A lost reply of an ack with completed work items still deleted them: their leases' acks then fail."""
    await start_instance(faulty, "i")
    await enqueue(faulty, event_message("i"))
    item = await fetch_one(faulty, "i")
    held = ack_for(
        item, history=[scheduled(2)], worker_items=[activity("i", 2)], lease_worker_items=1, keep_lock=60
    )
    [leases] = await faulty.ack_orchestration_items([held])
    assert isinstance(leases, list)
    faulty.ack_then_fail("orchestrator")
    with pytest.raises(ProviderError):
        await faulty.ack_orchestration_items(
            [ack_for(item, history=[raised(3)], completed_work_items=[leases[0].lock_token])]
        )
    assert [e.event_id for e in await faulty.read_history("i")] == [1, 2, 3]
    [result] = await faulty.ack_work_items([WorkItemAck(leases[0].lock_token, result_message("i", 2))])
    assert isinstance(result, ProviderError) and not result.retryable  # as for a cancelled activity
    assert await faulty.fetch_orchestration_items(10, 60) == []
