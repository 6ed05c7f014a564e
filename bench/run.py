"""The standard workloads (DESIGN.md), one JSON line per result, median of several runs.

    python bench/run.py --provider sqlite --workload hello --n 2000
    python bench/run.py --provider postgres --workload workers --url postgresql://postgres@127.0.0.1/test
    python bench/run.py --provider sqlite            # every workload with its default size

SQLite runs on a fresh file in a temp dir with the durable default (synchronous=FULL).
PostgreSQL runs in a fresh schema of the database at --url (or PERDURE_PG_URL), dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from perdure import (
    ActivityContext,
    Client,
    OrchestrationContext,
    Provider,
    Registry,
    Runtime,
    RuntimeOptions,
    connect,
)
from perdure import history as h

DEFAULT_N = {
    "hello": 2000,
    "chain": 500,
    "fanout": 1000,
    "history": 5000,
    "timers": 1000,
    "wakeup": 50,
    "workers": 2000,
}
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"

app = Registry()
_stamps: list[float] = []


@app.activity
def noop(ctx: ActivityContext, value: int) -> int:
    return value


@app.activity
def stamp(ctx: ActivityContext, value: int) -> int:
    _stamps.append(time.perf_counter())
    return value


@app.orchestration
async def hello(ctx: OrchestrationContext, value: int) -> int:
    return int(await ctx.call_activity(noop, value))


@app.orchestration
async def chain(ctx: OrchestrationContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += int(await ctx.call_activity(noop, i))
    return total


@app.orchestration
async def fanout(ctx: OrchestrationContext, n: int) -> int:
    return sum(await ctx.all([ctx.call_activity(noop, i) for i in range(n)]))


@app.orchestration
async def long_history(ctx: OrchestrationContext, steps: list[int]) -> int:
    warmup, measured = steps
    for i in range(warmup):
        await ctx.call_activity(noop, i)
    for i in range(measured + 1):
        await ctx.call_activity(stamp, i)
    return warmup


@app.orchestration
async def sleeper(ctx: OrchestrationContext, seconds: float) -> None:
    await ctx.sleep(seconds)


@app.orchestration
async def instant(ctx: OrchestrationContext) -> None:
    return None


# -- providers ------------------------------------------------------------------------------


class Target:
    """Makes fresh, isolated stores of one provider kind and cleans them up."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind = kind
        self.url = url or os.environ.get("PERDURE_PG_URL") or PG_DEFAULT
        self._tmp = tempfile.TemporaryDirectory(prefix="perdure-bench-")

    def new_location(self) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{Path(self._tmp.name) / (uuid.uuid4().hex + '.db')}"
        return f"bench_{uuid.uuid4().hex[:12]}"

    def open(self, location: str) -> Provider:
        if self.kind == "sqlite":
            return connect(location)
        return connect(self.url, schema=location)

    async def drop(self, location: str) -> None:
        if self.kind == "postgres":
            import psycopg

            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{location}" CASCADE')


@asynccontextmanager
async def store(target: Target) -> AsyncIterator[tuple[Provider, str]]:
    location = target.new_location()
    provider = target.open(location)
    await provider.open()
    try:
        yield provider, location
    finally:
        await provider.close()
        await target.drop(location)


def _options(**overrides: Any) -> RuntimeOptions:
    return RuntimeOptions(poll_interval=0.5, **overrides)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def start_and_wait(provider: Provider, n: int) -> dict[str, float]:
    """Start n hello orchestrations at once; throughput and true per-instance latency."""
    client = Runtime(provider, app).client
    starts: dict[str, float] = {}

    async def start(i: int) -> None:
        began = time.time()
        starts[await client.start_orchestration(hello, i)] = began

    began = time.time()
    await asyncio.gather(*(start(i) for i in range(n)))
    finished: list[float] = []
    latencies: list[float] = []
    for instance, started in starts.items():
        status = await client.wait_for_orchestration(instance, timeout=600)
        assert status.status == "completed", status
        finished.append(status.updated_at)
        latencies.append((status.updated_at - started) * 1000)
    elapsed = max(finished) - began
    return {
        "orchestrations_per_s": n / elapsed,
        "latency_ms_p50": percentile(latencies, 0.5),
        "latency_ms_p99": percentile(latencies, 0.99),
    }


# -- workloads (each returns {metric: value} for one run) -------------------------------------


async def w_hello(target: Target, n: int) -> dict[str, float]:
    async with store(target) as (provider, _), Runtime(provider, app, _options()):
        return await start_and_wait(provider, n)


async def w_chain(target: Target, n: int) -> dict[str, float]:
    async with store(target) as (provider, _), Runtime(provider, app, _options()) as runtime:
        began = time.perf_counter()
        instance = await runtime.client.start_orchestration(chain, n)
        status = await runtime.client.wait_for_orchestration(instance, timeout=600, poll_interval=0.05)
        assert status.result() == n * (n - 1) // 2
        return {"steps_per_s": n / (time.perf_counter() - began)}


async def w_fanout(target: Target, n: int) -> dict[str, float]:
    async with store(target) as (provider, _), Runtime(provider, app, _options()) as runtime:
        began = time.perf_counter()
        instance = await runtime.client.start_orchestration(fanout, n)
        status = await runtime.client.wait_for_orchestration(instance, timeout=600, poll_interval=0.05)
        assert status.result() == n * (n - 1) // 2
        return {"seconds": time.perf_counter() - began}


async def w_history(target: Target, n: int) -> dict[str, float]:
    """Per-turn cost after ~n history events versus after ~10 (each step adds two events)."""
    measured = 100
    costs = []
    for warmup in (5, n // 2):
        async with store(target) as (provider, _), Runtime(provider, app, _options()) as runtime:
            _stamps.clear()
            instance = await runtime.client.start_orchestration(long_history, [warmup, measured])
            await runtime.client.wait_for_orchestration(instance, timeout=600, poll_interval=0.05)
            costs.append((_stamps[-1] - _stamps[0]) / measured)
    return {
        "turn_cost_ratio": costs[1] / costs[0],
        "turn_ms_short": costs[0] * 1000,
        "turn_ms_long": costs[1] * 1000,
    }


async def w_timers(target: Target, n: int) -> dict[str, float]:
    delay = 3.0
    async with store(target) as (provider, _), Runtime(provider, app, _options()) as runtime:
        client = runtime.client
        await asyncio.gather(
            *(client.start_orchestration(sleeper, delay, instance_id=f"t-{i}") for i in range(n))
        )
        await asyncio.sleep(delay / 2)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lateness = []
        for i in range(n):
            await client.wait_for_orchestration(f"t-{i}", timeout=600)
            fired = [e for e in await client.read_history(f"t-{i}") if isinstance(e, h.TimerFired)]
            lateness.append(fired[0].timestamp_ms - fired[0].fire_at_ms)
        return {"peak_rss_mb": peak_rss_mb, "fire_lateness_ms_p99": percentile(lateness, 0.99)}


async def w_wakeup(target: Target, n: int) -> dict[str, float]:
    """An idle runtime picks up a newly enqueued orchestration: enqueue to its first turn.

    On PostgreSQL the client uses its own provider object (its own connections), as another
    process would, so the wake-up travels through LISTEN/NOTIFY.
    """
    async with store(target) as (provider, location), Runtime(provider, app, _options()):
        other = target.open(location) if target.kind == "postgres" else provider
        await other.open()
        client = Client(other)
        latencies = []
        try:
            for _ in range(n):
                await asyncio.sleep(0.05)  # let the runtime go idle
                enqueued_ms = time.time() * 1000
                instance = await client.start_orchestration(instant)
                await client.wait_for_orchestration(instance, timeout=60, poll_interval=0.01)
                started = (await client.read_history(instance))[0]
                latencies.append(started.timestamp_ms - enqueued_ms)
        finally:
            if other is not provider:
                await other.close()
        return {"wakeup_ms_p50": percentile(latencies, 0.5), "wakeup_ms_p99": percentile(latencies, 0.99)}


async def w_workers(target: Target, n: int, processes: int) -> dict[str, float]:
    if target.kind != "postgres":
        raise SystemExit("the workers workload needs a provider shared by processes: --provider postgres")
    async with store(target) as (provider, location):
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker-process", location, "--url", target.url],
                stdin=subprocess.DEVNULL,
            )
            for _ in range(processes)
        ]
        try:
            await asyncio.sleep(2.0)  # let them connect and go idle
            return await start_and_wait(provider, n)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)


async def worker_process(location: str, url: str) -> None:
    provider = connect(url, schema=location)
    async with Runtime(provider, app, _options()):
        await asyncio.Event().wait()


UNITS = {
    "orchestrations_per_s": "1/s",
    "latency_ms_p50": "ms",
    "latency_ms_p99": "ms",
    "steps_per_s": "1/s",
    "seconds": "s",
    "turn_cost_ratio": "x",
    "turn_ms_short": "ms",
    "turn_ms_long": "ms",
    "peak_rss_mb": "MB",
    "fire_lateness_ms_p99": "ms",
    "wakeup_ms_p50": "ms",
    "wakeup_ms_p99": "ms",
}


async def measure(
    name: str, run: Callable[[], Awaitable[dict[str, float]]], runs: int, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        for metric, value in (await run()).items():
            samples.setdefault(metric, []).append(value)
    return [
        {
            "workload": name,
            **extra,
            "metric": metric,
            "value": round(statistics.median(values), 3),
            "unit": UNITS[metric],
            "runs": [round(v, 3) for v in values],
        }
        for metric, values in samples.items()
    ]


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--provider", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--workload", choices=[*DEFAULT_N, "all"], default="all")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--url", default=None, help="PostgreSQL URL (default: PERDURE_PG_URL or the local server)"
    )
    parser.add_argument("--processes", default="1,2,4", help="worker process counts for the workers workload")
    parser.add_argument("--worker-process", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_process:
        await worker_process(args.worker_process, args.url)
        return
    target = Target(args.provider, args.url)
    names = [w for w in DEFAULT_N if w != "workers" or args.provider == "postgres"]
    for name in names if args.workload == "all" else [args.workload]:
        n = args.n or DEFAULT_N[name]
        base = {"provider": args.provider, "n": n}
        if name == "workers":
            for count in [int(p) for p in args.processes.split(",")]:

                async def run(count: int = count, n: int = n) -> dict[str, float]:
                    return await w_workers(target, n, count)

                lines = await measure(name, run, args.runs, {**base, "processes": count})
                for line in lines:
                    if line["metric"] == "orchestrations_per_s":
                        print(json.dumps(line), flush=True)
            continue
        workload = {
            "hello": w_hello,
            "chain": w_chain,
            "fanout": w_fanout,
            "history": w_history,
            "timers": w_timers,
            "wakeup": w_wakeup,
        }
        fn = workload[name]

        async def run_one(fn: Any = fn, n: int = n) -> dict[str, float]:
            result: dict[str, float] = await fn(target, n)
            return result

        for line in await measure(name, run_one, args.runs, base):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
