"""Building blocks the suite's tests share.

Message and event builders, one-line fetch and ack helpers that assert what they expect, and a
uniform driver over the two queues.

Everything here talks to the Provider directly, the way the runtime will: there is no runtime in
these tests. Helpers that take a lease default to :data:`LEASE`, long enough never to lapse
during a test; only the lock-expiry tests use the factory's short ``lock_timeout``.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pytest

from perdure.history import (
    ActivityExecute,
    ActivityRef,
    ActivityResult,
    ActivityScheduled,
    ContinueAsNew,
    EventRaised,
    Message,
    OrchestrationContinuedAsNew,
    OrchestrationStarted,
    ParentRef,
    RaiseEvent,
    StartOrchestration,
    TimerElapsed,
)
from perdure.provider import (
    InstanceInfo,
    OrchestrationAck,
    OrchestrationAckResult,
    OrchestrationItem,
    Provider,
    ProviderError,
    Queue,
    WorkItemAck,
    WorkItemAckResult,
    WorkItemLease,
)

T = TypeVar("T")

#: The result of an ack on either queue: ``None``, a direct hand-over, or the ack's error.
AckResult = OrchestrationAckResult | WorkItemAckResult

#: Lease for every test that does not test expiry: it never lapses during a test.
LEASE = 60.0
#: Orchestration name used unless a test needs another.
ORCH = "conformance-orchestration"
#: Activity name used unless a test needs another.
ACTIVITY = "conformance-activity"


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of ``visible_at_ms`` and event timestamps."""
    return int(time.time() * 1000)


# -- builders ----------------------------------------------------------------------------------


def started(
    event_id: int = 1,
    *,
    name: str = ORCH,
    version: str | None = None,
    input: str = '"input"',
    parent: ParentRef | None = None,
) -> OrchestrationStarted:
    """Build the first event of an execution."""
    return OrchestrationStarted(
        event_id=event_id, timestamp_ms=now_ms(), name=name, version=version, input=input, parent=parent
    )


def scheduled(event_id: int, *, name: str = ACTIVITY, input: str = '"x"') -> ActivityScheduled:
    """Build an ActivityScheduled event; its id is the activity id of the matching work item."""
    return ActivityScheduled(event_id=event_id, timestamp_ms=now_ms(), name=name, input=input)


def raised(event_id: int, data: str = '"d"', *, name: str = "evt") -> EventRaised:
    """Build an EventRaised history event, the simplest event a test can append."""
    return EventRaised(event_id=event_id, timestamp_ms=now_ms(), name=name, data=data)


def activity(
    instance_id: str, activity_id: int, *, execution_id: int = 1, name: str = ACTIVITY, input: str = '"x"'
) -> ActivityExecute:
    """Build a worker-queue item for one scheduled activity call."""
    return ActivityExecute(
        instance_id=instance_id, execution_id=execution_id, activity_id=activity_id, name=name, input=input
    )


def ref(item: ActivityExecute) -> ActivityRef:
    """Return the identity an ack uses to cancel ``item``."""
    return ActivityRef(item.instance_id, item.execution_id, item.activity_id)


def start_message(
    instance_id: str,
    *,
    name: str = ORCH,
    input: str = '"input"',
    version: str | None = None,
    parent: ParentRef | None = None,
) -> StartOrchestration:
    """Build a StartOrchestration message for execution 1 of ``instance_id``."""
    return StartOrchestration(instance_id=instance_id, name=name, input=input, version=version, parent=parent)


def event_message(instance_id: str, data: str = '"d"', *, name: str = "evt") -> RaiseEvent:
    """Build a RaiseEvent message, the simplest message a test can enqueue."""
    return RaiseEvent(instance_id=instance_id, name=name, data=data)


def result_message(
    instance_id: str, source_id: int, *, execution_id: int = 1, result: str = '"r"'
) -> ActivityResult:
    """Build an activity's completion, as a worker acks it."""
    return ActivityResult(
        instance_id=instance_id, execution_id=execution_id, source_id=source_id, result=result
    )


def timer_message(
    instance_id: str, fire_at_ms: int, *, source_id: int = 2, execution_id: int = 1
) -> TimerElapsed:
    """Build a durable timer message, invisible until ``fire_at_ms``."""
    return TimerElapsed(
        instance_id=instance_id, execution_id=execution_id, source_id=source_id, fire_at_ms=fire_at_ms
    )


# -- orchestrator queue ------------------------------------------------------------------------


async def enqueue(provider: Provider, *messages: Message) -> None:
    """Enqueue messages on the orchestrator queue."""
    await provider.enqueue_orchestrator_messages(list(messages))


async def fetch_items(provider: Provider, limit: int = 100, lease: float = LEASE) -> list[OrchestrationItem]:
    """Fetch up to ``limit`` orchestration items."""
    return await provider.fetch_orchestration_items(limit, lease)


async def fetch_one(
    provider: Provider, instance_id: str | None = None, lease: float = LEASE
) -> OrchestrationItem:
    """Fetch exactly one orchestration item (of ``instance_id`` if given); fail the test otherwise."""
    items = await provider.fetch_orchestration_items(1, lease)
    assert len(items) == 1, f"expected one orchestration item, the fetch returned {len(items)}"
    if instance_id is not None:
        assert items[0].instance_id == instance_id, (
            f"fetched {items[0].instance_id!r}, expected {instance_id!r}"
        )
    return items[0]


async def assert_no_orchestration_work(provider: Provider) -> None:
    """Fail if any instance can be fetched now."""
    items = await provider.fetch_orchestration_items(100, LEASE)
    assert items == [], f"expected no fetchable instance, got {[i.instance_id for i in items]}"


def ack_for(item: OrchestrationItem, **fields: object) -> OrchestrationAck:
    """Build an ack for ``item`` that commits ``fields`` (history, worker_items, status, ...).

    ``execution_id`` and ``name`` default to the instance's current ones (1 and the started
    orchestration's name for an instance not created yet).
    """
    execution_id = item.instance.execution_id if item.instance else 1
    name = item.instance.name if item.instance else _start_name(item.messages)
    base = OrchestrationAck(
        lock_token=item.lock_token, instance_id=item.instance_id, execution_id=execution_id, name=name
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def _start_name(messages: Sequence[Message]) -> str:
    for message in messages:
        if isinstance(message, StartOrchestration | ContinueAsNew):
            return message.name
    return ORCH


async def ack_ok(provider: Provider, *acks: OrchestrationAck) -> None:
    """Commit acks and fail the test unless every one succeeds."""
    results = await provider.ack_orchestration_items(list(acks))
    assert len(results) == len(acks), f"{len(acks)} acks returned {len(results)} results"
    for ack, result in zip(acks, results, strict=True):
        assert result is None, f"ack of {ack.instance_id!r} failed: {result!r}"


async def ack_fails(provider: Provider, ack: OrchestrationAck) -> ProviderError:
    """Commit one ack and fail the test unless it fails permanently; return the error."""
    results = await provider.ack_orchestration_items([ack])
    assert len(results) == 1, f"one ack returned {len(results)} results"
    return assert_permanent(results[0])


def assert_permanent(error: object) -> ProviderError:
    """Fail unless ``error`` is a permanent (non-retryable) ProviderError."""
    assert isinstance(error, ProviderError), f"expected a permanent ProviderError, got {error!r}"
    assert not error.retryable, f"expected a permanent error, got a retryable one: {error!r}"
    return error


async def raises_permanent(call: Awaitable[object]) -> ProviderError:
    """Await ``call`` and fail the test unless it raises a permanent ProviderError."""
    with pytest.raises(ProviderError) as raised:
        await call
    return assert_permanent(raised.value)


async def start_instance(
    provider: Provider,
    instance_id: str,
    *,
    name: str = ORCH,
    version: str | None = None,
    parent: ParentRef | None = None,
    input: str = '"input"',
) -> InstanceInfo:
    """Create an instance the way the runtime does: enqueue its start, fetch it, ack OrchestrationStarted."""
    await enqueue(
        provider, start_message(instance_id, name=name, input=input, version=version, parent=parent)
    )
    item = await fetch_one(provider, instance_id)
    event = started(name=name, version=version, input=input, parent=parent)
    ack = ack_for(item, name=name, version=version, parent=parent, history=[event], status="running")
    await ack_ok(provider, ack)
    info = await provider.get_instance(instance_id)
    assert info is not None, f"the creating ack did not create {instance_id!r}"
    return info


async def take_turn(provider: Provider, instance_id: str, **fields: object) -> OrchestrationItem:
    """Run one turn of an existing instance: deliver an event, fetch it, ack ``fields``; return the item.

    Event ids in ``fields['history']`` are the caller's: use ``info.last_event_id + 1`` onwards.
    """
    await enqueue(provider, event_message(instance_id))
    item = await fetch_one(provider, instance_id)
    await ack_ok(provider, ack_for(item, **fields))
    return item


async def schedule_activities(
    provider: Provider, instance_id: str, count: int = 1, *, input: str = '"x"'
) -> list[ActivityExecute]:
    """Put ``count`` activities of a (new or existing) instance on the worker queue, in order."""
    info = await provider.get_instance(instance_id) or await start_instance(provider, instance_id)
    first = info.last_event_id + 1
    items = [
        activity(instance_id, first + n, execution_id=info.execution_id, input=input) for n in range(count)
    ]
    history = [scheduled(item.activity_id, input=input) for item in items]
    await take_turn(provider, instance_id, history=history, worker_items=items)
    return items


async def continue_as_new(
    provider: Provider, instance_id: str, next_input: str, *, version: str | None = None
) -> int:
    """End the current execution with continue-as-new and start the next one; return its id."""
    info = await provider.get_instance(instance_id)
    assert info is not None
    new_id = info.execution_id + 1
    can_event = OrchestrationContinuedAsNew(
        event_id=info.last_event_id + 1, timestamp_ms=now_ms(), input=next_input, version=version
    )
    next_start = ContinueAsNew(
        instance_id=instance_id, execution_id=new_id, name=info.name, input=next_input, version=version
    )
    await take_turn(
        provider,
        instance_id,
        history=[can_event],
        status="continued_as_new",
        output=next_input,
        orchestrator_items=[next_start],
    )
    item = await fetch_one(provider, instance_id)
    assert item.messages == [next_start]
    ack = ack_for(
        item,
        execution_id=new_id,
        version=version,
        history=[started(name=info.name, version=version, input=next_input)],
        status="running",
    )
    await ack_ok(provider, ack)
    return new_id


# -- worker queue ------------------------------------------------------------------------------


async def fetch_work(provider: Provider, limit: int = 100, lease: float = LEASE) -> list[WorkItemLease]:
    """Lease up to ``limit`` work items."""
    return await provider.fetch_work_items(limit, lease)


async def fetch_one_work(provider: Provider, lease: float = LEASE) -> WorkItemLease:
    """Lease exactly one work item; fail the test otherwise."""
    leases = await provider.fetch_work_items(1, lease)
    assert len(leases) == 1, f"expected one work item, the fetch returned {len(leases)}"
    return leases[0]


async def assert_no_work_items(provider: Provider) -> None:
    """Fail if any work item can be leased now."""
    leases = await provider.fetch_work_items(100, LEASE)
    assert leases == [], f"expected no leasable work item, got {[lease.ref for lease in leases]}"


async def ack_work_ok(provider: Provider, lease: WorkItemLease, completion: Message | None = None) -> None:
    """Complete a lease and fail the test unless the ack succeeds."""
    [result] = await provider.ack_work_items([WorkItemAck(lease.lock_token, completion)])
    assert result is None, f"work ack of {lease.ref} failed: {result!r}"


async def ack_work_fails(
    provider: Provider, lock_token: str, completion: Message | None = None
) -> ProviderError:
    """Complete a lease and fail the test unless the ack fails permanently."""
    results = await provider.ack_work_items([WorkItemAck(lock_token, completion)])
    assert len(results) == 1, f"one ack returned {len(results)} results"
    return assert_permanent(results[0])


# -- timing ------------------------------------------------------------------------------------


async def timed(call: Awaitable[T]) -> tuple[T, float]:
    """Await ``call``; return its result and how many seconds it took."""
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


async def retrying(call: Callable[[], Awaitable[T]], *, attempts: int = 50, pause: float = 0.05) -> T:
    """Call until it succeeds, allowing only retryable ProviderErrors in between."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except ProviderError as exc:
            if not exc.retryable:
                pytest.fail(f"a call failed permanently where only retryable errors are allowed: {exc!r}")
            await asyncio.sleep(pause)
    return await call()


# -- both queues behind one interface ----------------------------------------------------------


@dataclass(frozen=True)
class Handle:
    """One fetched unit of work, whichever queue it came from; ``key`` is its instance id."""

    key: str
    token: str
    attempt_count: int
    content: object


class QueueDriver(abc.ABC):
    """The same peek-lock operations on either queue, so a rule that holds for both is one test.

    Work is identified by a key: on the orchestrator queue, a message for the instance ``key``
    (which is not created); on the worker queue, an activity of the instance ``key``.
    """

    queue: Queue

    @abc.abstractmethod
    async def put(self, provider: Provider, key: str) -> None:
        """Add one unit of work for ``key``."""

    @abc.abstractmethod
    async def fetch(self, provider: Provider, limit: int = 100, lease: float = LEASE) -> list[Handle]:
        """Fetch up to ``limit`` units."""

    @abc.abstractmethod
    async def ack(self, provider: Provider, handles: Sequence[Handle]) -> list[AckResult]:
        """Complete the units in one batch; return the per-ack results."""

    @abc.abstractmethod
    async def abandon(
        self, provider: Provider, handle: Handle, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release without completing."""

    @abc.abstractmethod
    async def renew(self, provider: Provider, handle: Handle, lease: float) -> bool:
        """Extend the lease; False when it is no longer held (a permanent error on the orchestrator queue)."""

    async def fetch_one(self, provider: Provider, lease: float = LEASE) -> Handle:
        """Fetch exactly one unit; fail the test otherwise."""
        handles = await self.fetch(provider, 1, lease)
        assert len(handles) == 1, f"expected one unit of {self.queue} work, the fetch returned {len(handles)}"
        return handles[0]

    async def ack_one(self, provider: Provider, handle: Handle) -> AckResult:
        """Complete one unit; return its result."""
        [result] = await self.ack(provider, [handle])
        return result

    def __repr__(self) -> str:
        return self.queue


class OrchestratorQueue(QueueDriver):
    """Units are instances with one message each; an ack commits an empty turn."""

    queue: Queue = "orchestrator"

    async def put(self, provider: Provider, key: str) -> None:
        """Enqueue one message for the instance ``key`` (it is not created)."""
        await enqueue(provider, event_message(key))

    async def fetch(self, provider: Provider, limit: int = 100, lease: float = LEASE) -> list[Handle]:
        """Fetch orchestration items."""
        items = await provider.fetch_orchestration_items(limit, lease)
        return [
            Handle(item.instance_id, item.lock_token, item.attempt_count, item.messages) for item in items
        ]

    async def ack(self, provider: Provider, handles: Sequence[Handle]) -> list[AckResult]:
        """Commit an empty turn per item."""
        acks = [
            OrchestrationAck(lock_token=h.token, instance_id=h.key, execution_id=1, name=ORCH)
            for h in handles
        ]
        return list(await provider.ack_orchestration_items(acks))

    async def abandon(
        self, provider: Provider, handle: Handle, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Abandon the instance lock."""
        await provider.abandon_orchestration_item(handle.token, delay=delay, ignore_attempt=ignore_attempt)

    async def renew(self, provider: Provider, handle: Handle, lease: float) -> bool:
        """Renew the instance lock; a permanent error means it is not held."""
        try:
            await provider.renew_orchestration_lock(handle.token, lease)
        except ProviderError as exc:
            assert_permanent(exc)
            return False
        return True


class WorkerQueue(QueueDriver):
    """Units are activities; each ``put`` creates the instance ``key`` if needed and schedules one."""

    queue: Queue = "worker"

    async def put(self, provider: Provider, key: str) -> None:
        """Schedule one activity of the instance ``key``, creating the instance if needed."""
        await schedule_activities(provider, key, 1)

    async def fetch(self, provider: Provider, limit: int = 100, lease: float = LEASE) -> list[Handle]:
        """Lease work items."""
        leases = await provider.fetch_work_items(limit, lease)
        return [
            Handle(lease.ref.instance_id, lease.lock_token, lease.attempt_count, lease.item)
            for lease in leases
        ]

    async def ack(self, provider: Provider, handles: Sequence[Handle]) -> list[AckResult]:
        """Complete each lease without a completion message."""
        return list(await provider.ack_work_items([WorkItemAck(h.token, None) for h in handles]))

    async def abandon(
        self, provider: Provider, handle: Handle, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Abandon the lease."""
        await provider.abandon_work_item(handle.token, delay=delay, ignore_attempt=ignore_attempt)

    async def renew(self, provider: Provider, handle: Handle, lease: float) -> bool:
        """Renew the lease."""
        results = await provider.renew_work_item_locks([handle.token], lease)
        assert len(results) == 1, f"one renewal returned {len(results)} results"
        return results[0]


QUEUE_DRIVERS: tuple[QueueDriver, ...] = (OrchestratorQueue(), WorkerQueue())

#: Parametrise a test over both queues: it receives a :class:`QueueDriver` as ``queue``.
both_queues = pytest.mark.parametrize("queue", QUEUE_DRIVERS, ids=lambda driver: str(driver))


def requires_hook(name: str) -> pytest.MarkDecorator:
    """Skip the test (naming the hook) unless the factory overrides ``name``."""
    return pytest.mark.requires_hook(name)


def requires_capability(name: str) -> pytest.MarkDecorator:
    """Skip the test (naming the capability) unless the provider declares ``name``."""
    return pytest.mark.requires_capability(name)
