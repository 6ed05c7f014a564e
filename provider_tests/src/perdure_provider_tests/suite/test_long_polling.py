"""Waiting for work: fetches never block, and waits never overrun their timeout.

A provider that declares ``wakeups`` also ends a wait as soon as work may be fetchable. A
spurious early return from a wait is allowed by the contract, so the wake-up tests run a small
dispatcher loop (fetch; if nothing, wait up to 30 s) and measure how soon after the trigger it
holds the work: only a real wake-up (or busy polling) gets it within ``wakeup_latency``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    Handle,
    OrchestratorQueue,
    QueueDriver,
    WorkerQueue,
    ack_for,
    ack_ok,
    ack_work_ok,
    activity,
    both_queues,
    enqueue,
    event_message,
    fetch_one,
    fetch_one_work,
    now_ms,
    requires_capability,
    result_message,
    schedule_activities,
    scheduled,
    start_instance,
    take_turn,
    timed,
    timer_message,
)

#: The timeout of the bounded waits (seconds).
WAIT = 0.3
#: The timeout a dispatcher waits with in the wake-up tests: far longer than any wake-up bound.
LONG_WAIT = 30.0


class _Dispatcher:
    """A minimal dispatcher loop on one queue; ``waiting`` is set each time it is about to wait."""

    def __init__(self, provider: Provider, queue: QueueDriver) -> None:
        self.provider = provider
        self.queue = queue
        self.waiting = asyncio.Event()
        self.task: asyncio.Task[Handle] = asyncio.ensure_future(self._run())

    async def _run(self) -> Handle:
        while True:
            handles = await self.queue.fetch(self.provider, 1)
            if handles:
                return handles[0]
            self.waiting.set()
            await self.provider.wait_for_work(self.queue.queue, LONG_WAIT)

    async def parked(self) -> None:
        """Return once the loop has found nothing and entered ``wait_for_work``."""
        await asyncio.wait_for(self.waiting.wait(), LONG_WAIT)

    async def picks_up_within(self, latency: float, after: str) -> Handle:
        """Fail the test unless the loop holds work within ``latency`` seconds from now."""
        try:
            return await asyncio.wait_for(self.task, latency)
        except TimeoutError:
            pytest.fail(f"wait_for_work({self.queue.queue!r}) was not woken within {latency}s after {after}")


@both_queues
async def test_wait_for_work_never_overruns_its_timeout(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """``wait_for_work`` never overruns its timeout, whether the queue is empty or its work locked."""
    bound = WAIT + provider_factory.timing_slack
    _, elapsed = await timed(provider.wait_for_work(queue.queue, WAIT))
    assert elapsed <= bound, f"an empty wait took {elapsed:.3f}s for a {WAIT}s timeout"
    await queue.put(provider, "i")
    await queue.fetch_one(provider)
    _, elapsed = await timed(provider.wait_for_work(queue.queue, WAIT))
    assert elapsed <= bound, f"a wait beside locked work took {elapsed:.3f}s for a {WAIT}s timeout"
    _, elapsed = await timed(provider.wait_for_work(queue.queue, 0))
    assert elapsed <= provider_factory.timing_slack, f"a zero-timeout wait took {elapsed:.3f}s"


@both_queues
async def test_empty_fetch_returns_promptly(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """A fetch with nothing eligible returns within ``short_poll_threshold``: fetches never long-poll."""
    handles, elapsed = await timed(queue.fetch(provider, 10))
    assert handles == []
    assert elapsed <= provider_factory.short_poll_threshold, f"an empty fetch took {elapsed:.3f}s"


async def test_wait_for_instance_change_never_overruns_its_timeout(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """``wait_for_instance_change`` never overruns its timeout when nothing changes."""
    await start_instance(provider, "i")
    for instance_id in ("i", "nobody"):
        _, elapsed = await timed(provider.wait_for_instance_change(instance_id, WAIT))
        assert elapsed <= WAIT + provider_factory.timing_slack, f"waited {elapsed:.3f}s for a {WAIT}s timeout"


@requires_capability("wakeups")
@both_queues
async def test_waits_end_when_work_arrives(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """With wake-ups, a dispatcher waiting on a queue holds new work promptly after it arrives."""
    dispatcher = _Dispatcher(provider, queue)
    await dispatcher.parked()
    await queue.put(provider, "i")
    handle = await dispatcher.picks_up_within(provider_factory.wakeup_latency, "new work arrived")
    assert handle.key == "i"


@requires_capability("wakeups")
@both_queues
async def test_wait_returns_at_once_when_work_is_waiting(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """With wake-ups, ``wait_for_work`` returns at once when fetchable work is already waiting."""
    await queue.put(provider, "i")
    try:
        await asyncio.wait_for(
            provider.wait_for_work(queue.queue, LONG_WAIT), provider_factory.wakeup_latency
        )
    except TimeoutError:
        pytest.fail(f"wait_for_work did not return within {provider_factory.wakeup_latency}s with work ready")


@requires_capability("wakeups")
async def test_ack_items_wake_the_orchestrator_queue(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, orchestrator items inserted by an orchestration ack wake orchestrator-queue waiters."""
    await start_instance(provider, "parent")
    await enqueue(provider, event_message("parent"))
    item = await fetch_one(provider, "parent")
    dispatcher = _Dispatcher(provider, OrchestratorQueue())
    await dispatcher.parked()
    await ack_ok(provider, ack_for(item, orchestrator_items=[event_message("child")]))
    handle = await dispatcher.picks_up_within(provider_factory.wakeup_latency, "an ack inserted a message")
    assert handle.key == "child"


@requires_capability("wakeups")
async def test_completion_wakes_the_orchestrator_queue(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, a work ack's completion wakes orchestrator-queue waiters."""
    [scheduled] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    dispatcher = _Dispatcher(provider, OrchestratorQueue())
    await dispatcher.parked()
    await ack_work_ok(provider, lease, result_message("i", scheduled.activity_id))
    handle = await dispatcher.picks_up_within(
        provider_factory.wakeup_latency, "a work ack enqueued a completion"
    )
    assert handle.key == "i"


@requires_capability("wakeups")
async def test_waits_end_when_a_timer_becomes_due(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, a wait ends when a delayed message becomes visible, not only at its timeout."""
    delay = 0.3
    await enqueue(provider, timer_message("i", now_ms() + int(delay * 1000)))
    dispatcher = _Dispatcher(provider, OrchestratorQueue())
    await dispatcher.parked()
    handle = await dispatcher.picks_up_within(delay + provider_factory.wakeup_latency, "a timer became due")
    assert handle.key == "i"


@requires_capability("wakeups")
@both_queues
async def test_abandon_wakes_waiters(
    provider: Provider, provider_factory: ProviderFactory, queue: QueueDriver
) -> None:
    """With wake-ups, work released by an abandon wakes waiters on its queue."""
    await queue.put(provider, "i")
    held = await queue.fetch_one(provider)
    dispatcher = _Dispatcher(provider, queue)
    await dispatcher.parked()
    await queue.abandon(provider, held)
    handle = await dispatcher.picks_up_within(provider_factory.wakeup_latency, "an abandon released work")
    assert handle.key == "i"


async def _woken_by(
    provider: Provider, factory: ProviderFactory, instance_id: str, change: Awaitable[object], what: str
) -> None:
    """Fail unless a ``wait_for_instance_change`` started before ``change`` returns promptly after it."""
    waiter = asyncio.ensure_future(provider.wait_for_instance_change(instance_id, LONG_WAIT))
    await asyncio.sleep(0)  # let the waiter start; it may only return early, never miss the change
    await change
    try:
        await asyncio.wait_for(waiter, factory.wakeup_latency)
    except TimeoutError:
        pytest.fail(f"wait_for_instance_change was not woken within {factory.wakeup_latency}s of {what}")


@requires_capability("wakeups")
async def test_instance_change_wakes_waiters(provider: Provider, provider_factory: ProviderFactory) -> None:
    """With wake-ups, an ack that changes the instance's status wakes ``wait_for_instance_change``."""
    await start_instance(provider, "i")
    turn = take_turn(provider, "i", status="completed", output='"done"')
    await _woken_by(provider, provider_factory, "i", turn, "a status change")


@requires_capability("wakeups")
async def test_custom_status_change_wakes_waiters(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, an ack that changes the instance's custom status wakes ``wait_for_instance_change``."""
    await start_instance(provider, "i")
    turn = take_turn(provider, "i", custom_status_changed=True, custom_status='"halfway"')
    await _woken_by(provider, provider_factory, "i", turn, "a custom status change")


@requires_capability("wakeups")
async def test_instance_creation_wakes_waiters(provider: Provider, provider_factory: ProviderFactory) -> None:
    """With wake-ups, the ack that creates an instance wakes ``wait_for_instance_change`` on it."""
    await _woken_by(provider, provider_factory, "i", start_instance(provider, "i"), "its creation")


@requires_capability("wakeups")
@requires_capability("direct_dispatch")
async def test_unleased_items_of_a_direct_ack_wake_the_worker_queue(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, the worker items a direct-dispatch ack leaves unleased wake worker-queue waiters."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    leased, free = activity("i", 2), activity("i", 3)
    dispatcher = _Dispatcher(provider, WorkerQueue())
    await dispatcher.parked()
    ack = ack_for(
        item, history=[scheduled(2), scheduled(3)], worker_items=[leased, free], lease_worker_items=1
    )
    [leases] = await provider.ack_orchestration_items([ack])
    assert isinstance(leases, list), f"the direct ack returned {leases!r}"
    handle = await dispatcher.picks_up_within(provider_factory.wakeup_latency, "a direct ack left an item")
    assert handle.content == free
