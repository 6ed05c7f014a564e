"""Stress workloads: the real perdure runtime driving a provider with many orchestrations at once.

The conformance suite checks each rule in isolation; these workloads check that the rules hold
together under load, end to end, and measure what the provider sustains. Each run starts
orchestrations (``max_concurrent`` in flight) for ``duration`` seconds, waits for the stragglers,
and checks every result:

* ``fanout``: each orchestration fans out ``tasks_per_instance`` activities (each sleeping
  ``activity_delay``), joins them and returns the sum of their results;
* ``large-payload``: each orchestration runs ``tasks_per_instance`` sequential activities that
  echo a ``payload_bytes`` payload, then a sub-orchestration that does the same, and returns a
  digest of everything it received.

From a test (``provider_factory`` is your conformance factory)::

    from perdure_provider_tests.stress import StressConfig, run_stress_with_factory

    async def test_stress(provider_factory):
        result = await run_stress_with_factory(provider_factory, StressConfig(duration=5))
        assert result.ok, result.summary()

From a shell, against any provider reachable by URL (``perdure.connect``)::

    python -m perdure_provider_tests.stress sqlite:///tmp/stress.db --duration 10 --concurrency 20

It prints a summary and one JSON line per metric, with the keys of the standard workloads in
``bench/`` (``workload``, ``provider``, ``n``, ``metric``, ``value``, ``unit``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime, RuntimeOptions
from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory

__all__ = [
    "StressConfig",
    "StressResult",
    "Workload",
    "main",
    "run_stress",
    "run_stress_with_factory",
]

Workload = Literal["fanout", "large-payload"]


@dataclass(frozen=True)
class StressConfig:
    """One stress run.

    ``runtimes`` runtimes share the provider object (several dispatchers racing one store);
    ``options`` configures each of them.
    """

    workload: Workload = "fanout"
    #: Seconds during which new orchestrations are started.
    duration: float = 10.0
    #: Orchestrations in flight at once.
    max_concurrent: int = 20
    #: Activities per orchestration.
    tasks_per_instance: int = 5
    #: Seconds each fan-out activity sleeps.
    activity_delay: float = 0.01
    #: Payload size of the large-payload workload, in bytes.
    payload_bytes: int = 100 * 1024
    #: Seconds an orchestration may take, start to finish, before it counts as failed.
    wait_timeout: float = 60.0
    runtimes: int = 1
    options: RuntimeOptions = field(default_factory=lambda: RuntimeOptions(poll_interval=0.2))


@dataclass
class StressResult:
    """What a run did and measured; :attr:`ok` says whether every orchestration was correct."""

    workload: Workload
    provider: str
    launched: int = 0
    completed: int = 0
    #: Failed, cancelled, or not finished within ``wait_timeout``.
    failed: int = 0
    #: Completed with a result other than the expected one.
    wrong: int = 0
    #: Activity executions (more than scheduled means redelivery: allowed, at-least-once).
    activity_runs: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    #: The first few failures, for the summary.
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every launched orchestration completed with the expected result."""
        return self.launched > 0 and self.completed == self.launched and not self.failed and not self.wrong

    @property
    def orchestrations_per_s(self) -> float:
        """Completed orchestrations per second of the whole run."""
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def activities_per_s(self) -> float:
        """Activity executions per second of the whole run."""
        return self.activity_runs / self.seconds if self.seconds else 0.0

    def latency_ms(self, quantile: float) -> float:
        """Start-to-finish latency of completed orchestrations at ``quantile`` (0.5 = median)."""
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    def summary(self) -> str:
        """A few human-readable lines."""
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"{verdict}: {self.workload} on {self.provider}: {self.completed}/{self.launched} completed, "
            f"{self.failed} failed, {self.wrong} wrong, {self.activity_runs} activity runs "
            f"in {self.seconds:.1f}s",
            f"  {self.orchestrations_per_s:.1f} orchestrations/s, {self.activities_per_s:.1f} activities/s, "
            f"latency p50 {self.latency_ms(0.5):.0f} ms, p99 {self.latency_ms(0.99):.0f} ms",
        ]
        lines += [f"  failure: {failure}" for failure in self.failures]
        return "\n".join(lines)

    def json_lines(self) -> list[str]:
        """One JSON object per metric, in the layout of the standard workloads in ``bench/``."""
        base = {"workload": f"stress-{self.workload}", "provider": self.provider, "n": self.launched}
        metrics = [
            ("orchestrations_per_s", self.orchestrations_per_s, "1/s"),
            ("activities_per_s", self.activities_per_s, "1/s"),
            ("latency_ms_p50", self.latency_ms(0.5), "ms"),
            ("latency_ms_p99", self.latency_ms(0.99), "ms"),
            ("failed", self.failed + self.wrong, "count"),
        ]
        return [json.dumps({**base, "metric": m, "value": round(v, 3), "unit": u}) for m, v, u in metrics]


@dataclass
class _Workload:
    registry: Registry
    orchestration: str
    make_input: Callable[[int], Any]
    expected: Callable[[Any], Any]


def _fanout(config: StressConfig, runs: Counter[str]) -> _Workload:
    registry = Registry()

    @registry.activity(name="stress_task")
    async def task(ctx: ActivityContext, n: int) -> int:
        runs["activity"] += 1
        await asyncio.sleep(config.activity_delay)
        return n * n

    @registry.orchestration(name="stress_fanout")
    async def fanout(ctx: OrchestrationContext, count: int) -> int:
        results = await ctx.all([ctx.call_activity(task, n) for n in range(count)])
        return sum(results)

    count = config.tasks_per_instance
    return _Workload(registry, "stress_fanout", lambda _: count, lambda _: sum(n * n for n in range(count)))


def _large_payload(config: StressConfig, runs: Counter[str]) -> _Workload:
    registry = Registry()

    @registry.activity(name="stress_echo")
    def echo(ctx: ActivityContext, payload: str) -> str:
        runs["activity"] += 1
        return payload

    @registry.orchestration(name="stress_payload_child")
    async def child(ctx: OrchestrationContext, payload: str) -> str:
        return str(await ctx.call_activity(echo, payload))

    @registry.orchestration(name="stress_payload")
    async def parent(ctx: OrchestrationContext, payload: str) -> str:
        digest = hashlib.sha256()
        for _ in range(config.tasks_per_instance):
            digest.update((await ctx.call_activity(echo, payload)).encode())
        digest.update((await ctx.call_sub_orchestration(child, payload)).encode())
        return digest.hexdigest()

    def make_input(n: int) -> str:
        seed = f"payload-{n}-"
        return (seed * (config.payload_bytes // len(seed) + 1))[: config.payload_bytes]

    def expected(payload: Any) -> str:
        digest = hashlib.sha256()
        for _ in range(config.tasks_per_instance + 1):
            digest.update(str(payload).encode())
        return digest.hexdigest()

    return _Workload(registry, "stress_payload", make_input, expected)


_WORKLOADS: dict[Workload, Callable[[StressConfig, Counter[str]], _Workload]] = {
    "fanout": _fanout,
    "large-payload": _large_payload,
}


async def run_stress(provider: Provider, config: StressConfig | None = None) -> StressResult:
    """Run one workload against ``provider`` (opened by the runtimes, left open) and check every result."""
    config = config or StressConfig()
    runs: Counter[str] = Counter()
    workload = _WORKLOADS[config.workload](config, runs)
    result = StressResult(config.workload, provider.name)
    runtimes = [Runtime(provider, workload.registry, config.options) for _ in range(max(1, config.runtimes))]
    for runtime in runtimes:
        await runtime.start()
    client = runtimes[0].client
    prefix = f"stress-{time.time_ns():x}"
    in_flight: set[asyncio.Task[None]] = set()

    async def one(n: int) -> None:
        payload = workload.make_input(n)
        instance_id = await client.start_orchestration(
            workload.orchestration, payload, instance_id=f"{prefix}-{n}"
        )
        started = time.monotonic()
        try:
            status = await client.wait_for_orchestration(instance_id, timeout=config.wait_timeout)
        except TimeoutError:
            _fail(result, f"{instance_id}: not finished after {config.wait_timeout}s")
            return
        if status.status != "completed":
            _fail(result, f"{instance_id}: {status.status}: {status.output}")
        elif status.result() != workload.expected(payload):
            result.wrong += 1
            _fail(result, f"{instance_id}: wrong result", count=False)
        else:
            result.completed += 1
            result.latencies_ms.append((time.monotonic() - started) * 1000)

    start = time.monotonic()
    try:
        while time.monotonic() - start < config.duration:
            if len(in_flight) >= config.max_concurrent:
                _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            task = asyncio.create_task(one(result.launched))
            result.launched += 1
            in_flight.add(task)
            await asyncio.sleep(0)
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        result.seconds = time.monotonic() - start
        result.activity_runs = runs["activity"]
        for task in in_flight:
            task.cancel()
        for runtime in runtimes:
            await runtime.shutdown(timeout=5)
    return result


async def run_stress_with_factory(
    factory: ProviderFactory, config: StressConfig | None = None
) -> StressResult:
    """Run one workload on a fresh provider from a conformance ``factory``, then dispose of it."""
    provider = await factory.create()
    try:
        return await run_stress(provider, config)
    finally:
        await factory.dispose(provider)


def _fail(result: StressResult, message: str, *, count: bool = True) -> None:
    if count:
        result.failed += 1
    if len(result.failures) < 5:
        result.failures.append(message)


def main(argv: list[str] | None = None, *, connect: Callable[[str], Provider] | None = None) -> int:
    """Command line: run a workload against the provider at a URL; exit status 1 unless it is OK."""
    parser = argparse.ArgumentParser(
        prog="python -m perdure_provider_tests.stress", description=__doc__.split("\n")[0]
    )
    parser.add_argument("url", help="provider URL for perdure.connect, e.g. sqlite:///tmp/stress.db")
    parser.add_argument("--workload", choices=list(_WORKLOADS), default="fanout")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of starting orchestrations")
    parser.add_argument("--concurrency", type=int, default=20, help="orchestrations in flight")
    parser.add_argument("--tasks", type=int, default=5, help="activities per orchestration")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds per fan-out activity")
    parser.add_argument("--payload-bytes", type=int, default=100 * 1024)
    parser.add_argument("--runtimes", type=int, default=1, help="runtimes sharing the provider")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")
    args = parser.parse_args(argv)
    config = StressConfig(
        workload=args.workload,
        duration=args.duration,
        max_concurrent=args.concurrency,
        tasks_per_instance=args.tasks,
        activity_delay=args.delay,
        payload_bytes=args.payload_bytes,
        runtimes=args.runtimes,
    )
    if connect is None:
        from perdure import connect as connect_url

        connect = connect_url
    provider = connect(args.url)

    async def run() -> StressResult:
        try:
            return await run_stress(provider, config)
        finally:
            await provider.close()

    result = asyncio.run(run())
    if not args.json:
        print(result.summary())
    for line in result.json_lines():
        print(line)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
