"""Micro-benchmark of the SQLite provider alone (no engine): what a runtime could get out of it.

    python providers/sqlite/tests/bench_provider.py [--n 5000] [--durability full|fast] [--memory]

``cycles``: N x (enqueue one start, fetch it, ack it with a one-event history), with several
concurrent callers. ``hello``: the provider traffic of N "hello" orchestrations (start, turn 1
schedules an activity, the worker completes it, turn 2 completes the orchestration) driven by
concurrent orchestration and worker loops, as a runtime would. Prints one JSON line per result,
with the process CPU time per item (all threads), steadier than the rate on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

from perdure.history import (
    ActivityExecute,
    ActivityResult,
    ActivityScheduled,
    OrchestrationCompleted,
    OrchestrationStarted,
    StartOrchestration,
)
from perdure.provider import OrchestrationAck, OrchestrationItem, WorkItemAck
from perdure_sqlite import SqliteProvider

LOCK = 30.0


def _ms() -> int:
    return int(time.time() * 1000)


async def cycles(provider: SqliteProvider, n: int, callers: int = 16, prefix: str = "c") -> float:
    async def caller(ids: range) -> None:
        for i in ids:
            instance_id = f"{prefix}{i}"
            await provider.enqueue_orchestrator_messages(
                [StartOrchestration(instance_id=instance_id, name="wf", input="1")]
            )
            items = await provider.fetch_orchestration_items(1, LOCK)
            acks = [
                OrchestrationAck(
                    lock_token=item.lock_token,
                    instance_id=item.instance_id,
                    execution_id=1,
                    name="wf",
                    history=[
                        OrchestrationStarted(
                            event_id=1, timestamp_ms=_ms(), name="wf", version=None, input="1"
                        )
                    ],
                )
                for item in items
            ]
            errors = await provider.ack_orchestration_items(acks)
            assert all(e is None for e in errors), errors

    began = time.perf_counter()
    per = n // callers
    await asyncio.gather(*(caller(range(c * per, (c + 1) * per)) for c in range(callers)))
    return per * callers / (time.perf_counter() - began)


def _turn(item: OrchestrationItem) -> OrchestrationAck:
    now = _ms()
    iid = item.instance_id
    if item.instance is None:
        return OrchestrationAck(
            lock_token=item.lock_token,
            instance_id=iid,
            execution_id=1,
            name="hello",
            history=[
                OrchestrationStarted(event_id=1, timestamp_ms=now, name="hello", version=None, input="1"),
                ActivityScheduled(event_id=2, timestamp_ms=now, name="noop", input="1"),
            ],
            worker_items=[
                ActivityExecute(instance_id=iid, execution_id=1, activity_id=2, name="noop", input="1")
            ],
            status="running",
        )
    return OrchestrationAck(
        lock_token=item.lock_token,
        instance_id=iid,
        execution_id=1,
        name="hello",
        history=[OrchestrationCompleted(event_id=3, timestamp_ms=now, output="1")],
        status="completed",
        output="1",
    )


async def hello(
    provider: SqliteProvider, n: int, batch: int = 64, loops: int = 2, prefix: str = "h"
) -> float:
    done = asyncio.Event()
    completed = 0

    async def orchestrations() -> None:
        nonlocal completed
        while not done.is_set():
            items = await provider.fetch_orchestration_items(batch, LOCK)
            if not items:
                await provider.wait_for_work("orchestrator", 0.05)
                continue
            acks = [_turn(item) for item in items]
            errors = await provider.ack_orchestration_items(acks)
            assert all(e is None for e in errors), errors
            completed += sum(1 for ack in acks if ack.status == "completed")
            if completed >= n:
                done.set()

    async def workers() -> None:
        while not done.is_set():
            leases = await provider.fetch_work_items(batch, LOCK)
            if not leases:
                await provider.wait_for_work("worker", 0.05)
                continue
            acks = [
                WorkItemAck(
                    lease.lock_token,
                    ActivityResult(
                        instance_id=lease.ref.instance_id,
                        execution_id=lease.ref.execution_id,
                        source_id=lease.ref.activity_id,
                        result="1",
                    ),
                )
                for lease in leases
            ]
            errors = await provider.ack_work_items(acks)
            assert all(e is None for e in errors), errors

    began = time.perf_counter()
    # Clients start every orchestration at once (one enqueue call each), as bench `hello` does.
    starts = [
        provider.enqueue_orchestrator_messages(
            [StartOrchestration(instance_id=f"{prefix}{i}", name="hello", input="1")]
        )
        for i in range(n)
    ]
    tasks = [asyncio.create_task(orchestrations()) for _ in range(loops)]
    tasks += [asyncio.create_task(workers()) for _ in range(loops)]
    await asyncio.gather(*starts)
    finished = asyncio.create_task(done.wait())
    await asyncio.wait([finished, *tasks], return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.perf_counter() - began
    for task in [finished, *tasks]:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):
            raise RuntimeError("a benchmark loop failed") from outcome
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--durability", choices=["full", "fast"], default="full")
    parser.add_argument("--memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("cycles", "hello"):
            path = ":memory:" if args.memory else os.path.join(tmp, f"{workload}.db")
            async with SqliteProvider(path, durability=args.durability) as provider:
                assert provider._db is not None
                fn = cycles if workload == "cycles" else hello
                began_tx = provider._db.transactions
                began_cpu = time.process_time()
                rate = await fn(provider, args.n)
                cpu_us = (time.process_time() - began_cpu) / args.n * 1e6
                tx = provider._db.transactions - began_tx
                jobs = provider._db.write_jobs
            print(
                json.dumps(
                    {
                        "workload": workload,
                        "provider": "sqlite",
                        "durability": "memory" if args.memory else args.durability,
                        "n": args.n,
                        "metric": "cycles_per_s" if workload == "cycles" else "orchestrations_per_s",
                        "value": round(rate, 1),
                        "unit": "1/s",
                        "cpu_us_per_item": round(cpu_us),
                        "transactions": tx,
                        "write_jobs": jobs,
                    }
                )
            )


if __name__ == "__main__":
    asyncio.run(main())
