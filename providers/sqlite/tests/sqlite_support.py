"""Builders shared by the perdure-sqlite tests."""

from __future__ import annotations

import time
from collections.abc import Sequence

from perdure.history import (
    ActivityExecute,
    ActivityResult,
    ActivityScheduled,
    Event,
    Message,
    OrchestrationCompleted,
    OrchestrationStarted,
    RaiseEvent,
    StartOrchestration,
    TimerElapsed,
)
from perdure.provider import OrchestrationAck, OrchestrationItem, Provider

LOCK = 30.0


def now_ms() -> int:
    return int(time.time() * 1000)


def start(instance_id: str, name: str = "wf", input: str = '"in"') -> StartOrchestration:
    return StartOrchestration(instance_id=instance_id, name=name, input=input)


def raise_event(instance_id: str, name: str = "ev", data: str = '"x"') -> RaiseEvent:
    return RaiseEvent(instance_id=instance_id, name=name, data=data)


def timer(instance_id: str, fire_at_ms: int, execution_id: int = 1, source_id: int = 2) -> TimerElapsed:
    return TimerElapsed(
        instance_id=instance_id, execution_id=execution_id, source_id=source_id, fire_at_ms=fire_at_ms
    )


def started(event_id: int = 1, name: str = "wf", input: str = '"in"') -> OrchestrationStarted:
    return OrchestrationStarted(
        event_id=event_id, timestamp_ms=now_ms(), name=name, version=None, input=input
    )


def scheduled(event_id: int, name: str = "act") -> ActivityScheduled:
    return ActivityScheduled(event_id=event_id, timestamp_ms=now_ms(), name=name, input='"a"')


def completed(event_id: int, output: str = '"done"') -> OrchestrationCompleted:
    return OrchestrationCompleted(event_id=event_id, timestamp_ms=now_ms(), output=output)


def activity(instance_id: str, activity_id: int, execution_id: int = 1, name: str = "act") -> ActivityExecute:
    return ActivityExecute(
        instance_id=instance_id, execution_id=execution_id, activity_id=activity_id, name=name, input='"a"'
    )


def result(instance_id: str, source_id: int, execution_id: int = 1) -> ActivityResult:
    return ActivityResult(
        instance_id=instance_id, execution_id=execution_id, source_id=source_id, result='"r"'
    )


def ack_for(
    item: OrchestrationItem,
    *,
    execution_id: int = 1,
    history: Sequence[Event] = (),
    worker_items: Sequence[ActivityExecute] = (),
    orchestrator_items: Sequence[Message] = (),
    **fields: object,
) -> OrchestrationAck:
    return OrchestrationAck(
        lock_token=item.lock_token,
        instance_id=item.instance_id,
        execution_id=execution_id,
        name="wf",
        history=history,
        worker_items=worker_items,
        orchestrator_items=orchestrator_items,
        **fields,  # type: ignore[arg-type]
    )


async def fetch_one(provider: Provider, lock_timeout: float = LOCK) -> OrchestrationItem:
    items = await provider.fetch_orchestration_items(1, lock_timeout)
    assert len(items) == 1, items
    return items[0]


async def create_instance(provider: Provider, instance_id: str, *, activities: Sequence[int] = ()) -> None:
    """Start an instance and commit its first turn (history 1 + one schedule per activity)."""
    await provider.enqueue_orchestrator_messages([start(instance_id)])
    item = await fetch_one(provider)
    assert item.instance_id == instance_id
    history: list[Event] = [started()] + [scheduled(a) for a in activities]
    errors = await provider.ack_orchestration_items(
        [ack_for(item, history=history, worker_items=[activity(instance_id, a) for a in activities])]
    )
    assert errors == [None]
