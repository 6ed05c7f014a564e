"""Small builders shared by the PostgreSQL provider tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from perdure.history import (
    ActivityExecute,
    ActivityScheduled,
    Message,
    OrchestrationStarted,
    RaiseEvent,
    StartOrchestration,
)
from perdure.provider import OrchestrationAck, OrchestrationItem
from perdure_postgres import PostgresProvider

LEASE = 30.0


def now_ms() -> int:
    return int(time.time() * 1000)


def start(instance_id: str, name: str = "wf") -> StartOrchestration:
    return StartOrchestration(instance_id=instance_id, name=name, input='"in"')


def event(instance_id: str, name: str = "e", data: str = "1") -> RaiseEvent:
    return RaiseEvent(instance_id=instance_id, name=name, data=data)


def first_ack(item: OrchestrationItem, *, activities: int = 0, **fields: Any) -> OrchestrationAck:
    """The ack of a first turn: OrchestrationStarted, then ``activities`` scheduled activities."""
    ts = now_ms()
    history: list[Any] = [
        OrchestrationStarted(event_id=1, timestamp_ms=ts, name="wf", version=None, input='"in"')
    ]
    workers = []
    for k in range(activities):
        history.append(ActivityScheduled(event_id=2 + k, timestamp_ms=ts, name="act", input=str(k)))
        workers.append(
            ActivityExecute(
                instance_id=item.instance_id, execution_id=1, activity_id=2 + k, name="act", input=str(k)
            )
        )
    return OrchestrationAck(
        lock_token=item.lock_token,
        instance_id=item.instance_id,
        execution_id=1,
        name="wf",
        history=history,
        worker_items=workers,
        status="running",
        **fields,
    )


def empty_ack(item: OrchestrationItem, **fields: Any) -> OrchestrationAck:
    """An ack that only consumes the messages (and applies ``fields``)."""
    return OrchestrationAck(
        lock_token=item.lock_token, instance_id=item.instance_id, execution_id=1, name="wf", **fields
    )


async def enqueue(provider: PostgresProvider, *messages: Message) -> None:
    await provider.enqueue_orchestrator_messages(list(messages))


def table(provider: PostgresProvider, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(provider.schema), sql.Identifier(name))


def count(admin: psycopg.Connection[Any], provider: PostgresProvider, name: str, where: str = "true") -> int:
    query = sql.SQL("SELECT count(*) FROM {} WHERE " + where).format(table(provider, name))
    row = admin.execute(query).fetchone()
    assert row is not None
    return int(row[0])


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Wait until ``check()`` is true (sync or async), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
