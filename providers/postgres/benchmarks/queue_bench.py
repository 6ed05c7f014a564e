"""Micro-benchmark: enqueue -> fetch -> ack cycles through both queues of the PostgreSQL provider.

Each cycle is what one orchestration with one activity costs the provider, without a runtime:
enqueue a StartOrchestration; fetch the instance; ack the turn (2 history events, 1 activity);
fetch the activity; ack it with its result; fetch the instance again; ack the final turn
(2 history events, status completed). That is 7 provider operations per cycle.

    python providers/postgres/benchmarks/queue_bench.py --n 5000 --batch 50 --concurrency 4

PostgreSQL from ``--dsn`` or ``PERDURE_PG_URL`` (default: the local test server). A fresh schema is
created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import psycopg

from perdure.history import (
    ActivityCompleted,
    ActivityExecute,
    ActivityResult,
    ActivityScheduled,
    OrchestrationCompleted,
    OrchestrationStarted,
    StartOrchestration,
)
from perdure.provider import OrchestrationAck, WorkItemAck
from perdure_postgres import PostgresProvider

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


async def orchestrator_loop(p: PostgresProvider, batch: int, done: list[int], total: int) -> None:
    """Run turns until ``total`` orchestrations completed: start -> one activity -> complete."""
    while done[0] < total:
        items = await p.fetch_orchestration_items(batch, 30)
        if not items:
            await p.wait_for_work("orchestrator", 0.05)
            continue
        acks = []
        for it in items:
            info = it.instance
            now = int(time.time() * 1000)
            if info is None:
                acks.append(
                    OrchestrationAck(
                        lock_token=it.lock_token,
                        instance_id=it.instance_id,
                        execution_id=1,
                        name="bench",
                        history=[
                            OrchestrationStarted(
                                event_id=1, timestamp_ms=now, name="bench", version=None, input="1"
                            ),
                            ActivityScheduled(event_id=2, timestamp_ms=now, name="noop", input="1"),
                        ],
                        worker_items=[
                            ActivityExecute(
                                instance_id=it.instance_id,
                                execution_id=1,
                                activity_id=2,
                                name="noop",
                                input="1",
                            )
                        ],
                        status="running",
                    )
                )
            else:
                acks.append(
                    OrchestrationAck(
                        lock_token=it.lock_token,
                        instance_id=it.instance_id,
                        execution_id=1,
                        name="bench",
                        history=[
                            ActivityCompleted(event_id=3, timestamp_ms=now, source_id=2, result="1"),
                            OrchestrationCompleted(event_id=4, timestamp_ms=now, output="1"),
                        ],
                        status="completed",
                        output="1",
                    )
                )
        results = await p.ack_orchestration_items(acks)
        for ack, err in zip(acks, results, strict=True):
            if err is not None:
                raise err
            if ack.status == "completed":
                done[0] += 1


async def worker_loop(p: PostgresProvider, batch: int, done: list[int], total: int) -> None:
    """Complete activities until ``total`` orchestrations completed."""
    while done[0] < total:
        leases = await p.fetch_work_items(batch, 30)
        if not leases:
            await p.wait_for_work("worker", 0.05)
            continue
        acks = [
            WorkItemAck(
                lock_token=lease.lock_token,
                completion=ActivityResult(
                    instance_id=lease.ref.instance_id,
                    execution_id=lease.ref.execution_id,
                    source_id=2,
                    result="1",
                ),
            )
            for lease in leases
        ]
        for err in await p.ack_work_items(acks):
            if err is not None:
                raise err


async def main() -> None:
    """Parse the arguments, run the cycles on a fresh schema, print the rates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("PERDURE_PG_URL", DEFAULT_DSN))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=2, help="fetch loops per queue")
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    provider = PostgresProvider(args.dsn, schema=schema, max_pool_size=2 * args.concurrency + 2)
    await provider.open()
    try:
        start = time.perf_counter()
        for i in range(0, args.n, 500):
            await provider.enqueue_orchestrator_messages(
                [
                    StartOrchestration(instance_id=f"o{j}", name="bench", input="1")
                    for j in range(i, min(i + 500, args.n))
                ]
            )
        enqueued = time.perf_counter()
        done = [0]
        loops = [orchestrator_loop(provider, args.batch, done, args.n) for _ in range(args.concurrency)]
        loops += [worker_loop(provider, args.batch, done, args.n) for _ in range(args.concurrency)]
        await asyncio.gather(*loops)
        end = time.perf_counter()
        ops = args.n * 7
        print(
            f"n={args.n} batch={args.batch} concurrency={args.concurrency}: enqueue {enqueued - start:.2f}s, "
            f"process {end - enqueued:.2f}s -> {args.n / (end - enqueued):,.0f} cycles/s, "
            f"{ops / (end - start):,.0f} provider ops/s overall"
        )
    finally:
        await provider.close()
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    asyncio.run(main())
