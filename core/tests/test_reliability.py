"""The runtime under provider faults: every fault is survived without losing or duplicating a turn.

Faults come from ``perdure_provider_tests.faults.FaultyProvider`` wrapped around the provider under
test. Each test checks the orchestration's result, the exact history (compared with a fault-free
run: a duplicated or lost turn would show as extra or missing events) and how often each
activity ran.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from perdure import ActivityContext, Client, OrchestrationContext, Provider, Registry, Runtime, RuntimeOptions
from perdure import history as h

faults = pytest.importorskip("perdure_provider_tests.faults")
FaultyProvider = faults.FaultyProvider

runs: Counter[str] = Counter()
app = Registry()


@app.activity
def step(ctx: ActivityContext, name: str) -> str:
    runs[name] += 1
    return name.upper()


@app.orchestration
async def pipeline(ctx: OrchestrationContext, prefix: str) -> list[str]:
    first = await ctx.call_activity(step, f"{prefix}-a")
    both = await ctx.all([ctx.call_activity(step, f"{prefix}-b"), ctx.call_activity(step, f"{prefix}-c")])
    await ctx.sleep(0.05)
    return [first, *both]


def options(**overrides: Any) -> RuntimeOptions:
    base: dict[str, Any] = {
        "poll_interval": 0.1,
        "orchestration_lock_timeout": 1.0,
        "activity_lock_timeout": 1.0,
        "shutdown_timeout": 2.0,
    }
    base.update(overrides)
    return RuntimeOptions(**base)


def shape(events: list[h.Event]) -> list[str]:
    return [e.TYPE for e in events]


async def run_pipeline(provider: Provider, prefix: str) -> tuple[list[str], list[str]]:
    async with Runtime(provider, app, options()) as runtime:
        instance = await runtime.client.start_orchestration(pipeline, prefix)
        status = await runtime.client.wait_for_orchestration(instance, timeout=30)
        history = await runtime.client.read_history(instance)
    return status.result(), shape(history)


@pytest.fixture
async def reference(provider: Provider) -> list[str]:
    runs.clear()
    result, history = await run_pipeline(provider, "ref")
    assert result == ["REF-A", "REF-B", "REF-C"]
    return history


Inject = Callable[[Any], None]

# (fault, whether an activity may legitimately run twice: an ack that never reached the store)
FAULTS: dict[str, tuple[Inject, bool]] = {
    "orchestrator fetch fails": (lambda f: f.fail_next_fetch("orchestrator", times=3), False),
    "worker fetch fails": (lambda f: f.fail_next_fetch("worker", times=3), False),
    "turn ack fails, retryable": (lambda f: f.fail_next_ack("orchestrator", times=2), False),
    "turn ack fails, permanent": (lambda f: f.fail_next_ack("orchestrator", retryable=False), False),
    "turn ack commits then fails": (lambda f: f.ack_then_fail("orchestrator", times=2), False),
    "activity ack fails, retryable": (lambda f: f.fail_next_ack("worker", times=2), False),
    "activity ack fails, permanent": (lambda f: f.fail_next_ack("worker", retryable=False), True),
    "activity ack commits then fails": (lambda f: f.ack_then_fail("worker", times=2), False),
    "history read fails": (lambda f: f.fail_next("read_history", times=2), False),
    "slow acks": (lambda f: f.delay_next(["ack_orchestration_items", "ack_work_items"], 0.2, times=3), False),
    "connection drops": (lambda f: f.drop_connections(times=5), False),
}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "queued"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_runtime_survives_provider_fault(
    provider: Provider, reference: list[str], fault: str, direct: bool
) -> None:
    """Each fault, with work handed over directly by acks and through the queues' fetches."""
    if direct and fault == "worker fetch fails" and provider.capabilities.direct_dispatch:
        pytest.skip("with direct dispatch every activity here is leased by a turn's ack, never fetched")
    inject, may_rerun = FAULTS[fault]
    faulty = FaultyProvider(provider)
    inject(faulty)
    runs.clear()
    client = Client(provider)  # the faults are the runtime's to survive, not the test's
    cache_size = 0 if "history" in fault else 10_000
    async with Runtime(faulty, app, options(cache_size=cache_size, direct_dispatch=direct)):
        instance = await client.start_orchestration(pipeline, "x")
        status = await client.wait_for_orchestration(instance, timeout=30)
        history = shape(await client.read_history(instance))
    assert status.result() == ["X-A", "X-B", "X-C"]
    assert history == reference, "a turn was lost or committed twice"
    assert faulty.pending == 0, "a fault was never applied: the test proved nothing"
    limit = 2 if may_rerun else 1
    assert all(1 <= runs[name] <= limit for name in ("x-a", "x-b", "x-c")), dict(runs)
    if not may_rerun:
        assert sum(runs.values()) == 3


async def test_an_ack_lost_after_commit_is_not_replayed_into_duplicates(provider: Provider) -> None:
    """A long chain where every third turn ack 'fails' after committing still ends with one history."""
    faulty = FaultyProvider(provider)
    runs.clear()

    @app.orchestration(name="long_chain")
    async def long_chain(ctx: OrchestrationContext, n: int) -> int:
        for i in range(n):
            await ctx.call_activity(step, f"chain-{i}")
        return n

    client = Client(provider)
    async with Runtime(faulty, app, options()):
        instance = await client.start_orchestration("long_chain", 12)
        for _ in range(4):
            faulty.ack_then_fail("orchestrator")
            await asyncio.sleep(0.05)
        status = await client.wait_for_orchestration(instance, timeout=30)
        history = await client.read_history(instance)
    assert status.result() == 12
    assert [e.event_id for e in history] == list(range(1, len(history) + 1))
    assert sum(isinstance(e, h.ActivityScheduled) for e in history) == 12
    assert all(runs[f"chain-{i}"] == 1 for i in range(12))


async def test_a_provider_bug_does_not_stop_the_dispatchers(provider: Provider) -> None:
    """An unexpected exception from a fetch is logged and retried; the dispatchers keep running."""

    class Buggy(FaultyProvider):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Provider) -> None:
            super().__init__(inner)
            self.bugs = {"fetch_orchestration_items": 2, "fetch_work_items": 2}

        async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> Any:
            if self.bugs["fetch_orchestration_items"]:
                self.bugs["fetch_orchestration_items"] -= 1
                raise TypeError("a bug in the provider")
            return await super().fetch_orchestration_items(limit, lock_timeout)

        async def fetch_work_items(self, limit: int, lock_timeout: float) -> Any:
            if self.bugs["fetch_work_items"]:
                self.bugs["fetch_work_items"] -= 1
                raise KeyError("another bug")
            return await super().fetch_work_items(limit, lock_timeout)

    buggy = Buggy(provider)
    runs.clear()
    client = Client(provider)
    async with Runtime(buggy, app, options()):
        instance = await client.start_orchestration(pipeline, "bug")
        status = await client.wait_for_orchestration(instance, timeout=30)
    assert status.result() == ["BUG-A", "BUG-B", "BUG-C"]
    assert buggy.bugs == {"fetch_orchestration_items": 0, "fetch_work_items": 0}
