"""End-to-end tests: runtime, client and a real provider (see conftest: memory, sqlite, postgres).

Each test runs in every mode of conftest.MODES (cache on and off, direct dispatch on and off);
results must be identical.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import pydantic
import pytest
from conftest import MODES

from perdure import (
    ActivityContext,
    ActivityFailed,
    Client,
    InstanceAlreadyExists,
    OrchestrationContext,
    OrchestrationFailed,
    Provider,
    Registry,
    RetryPolicy,
    Runtime,
    RuntimeOptions,
    SubOrchestrationFailed,
)
from perdure import history as h
from perdure.provider import OrchestrationItem, WorkItemLease
from perdure.serialization import SerializationError


def options(mode: dict[str, Any], **overrides: Any) -> RuntimeOptions:
    base: dict[str, Any] = {
        **mode,
        "poll_interval": 0.2,
        "unknown_name_backoff": 0.05,
        "unknown_name_max_backoff": 0.2,
        "shutdown_timeout": 5.0,
    }
    base.update(overrides)
    return RuntimeOptions(**base)


@pytest.fixture
async def runtime_factory(provider: Provider, mode: dict[str, Any]) -> AsyncIterator[Any]:
    started: list[Runtime] = []

    async def make(registry: Registry, **overrides: Any) -> Runtime:
        runtime = Runtime(provider, registry, options(mode, **overrides))
        await runtime.start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.shutdown(timeout=2)


class Item(pydantic.BaseModel):
    sku: str
    price: float


class Quote(pydantic.BaseModel):
    total: float
    items: list[Item]


class Size(Enum):
    SMALL = "s"
    LARGE = "l"


@dataclass
class Order:
    id: str
    quantity: int
    size: Size
    placed: datetime


@dataclass
class Receipt:
    order_id: str
    total: int


# -- the basics ----------------------------------------------------------------------------------


async def test_hello_world_with_typed_dataclass_payloads(runtime_factory: Any) -> None:
    app = Registry()
    threads: list[str] = []

    @app.activity
    def price(ctx: ActivityContext, order: Order) -> Receipt:
        threads.append(threading.current_thread().name)
        assert isinstance(order.placed, datetime) and order.size is Size.LARGE
        return Receipt(order.id, order.quantity * 10)

    @app.orchestration
    async def checkout(ctx: OrchestrationContext, order: Order) -> Receipt:
        receipt = await ctx.call_activity(price, order)
        assert isinstance(receipt, Receipt)
        return receipt

    runtime = await runtime_factory(app)
    order = Order("o-1", 3, Size.LARGE, datetime(2026, 1, 2, 3, 4, 5))
    instance = await runtime.client.start_orchestration(checkout, order)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.status == "completed"
    assert status.result(Receipt) == Receipt("o-1", 30)
    assert threads and threads[0].startswith("perdure-activity")


async def test_fan_out_fan_in(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    async def square(ctx: ActivityContext, n: int) -> int:
        return n * n

    @app.orchestration
    async def fan(ctx: OrchestrationContext, n: int) -> int:
        results = await ctx.all([ctx.call_activity(square, i) for i in range(n)])
        return sum(results)

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(fan, 50)
    status = await runtime.client.wait_for_orchestration(instance, timeout=20)
    assert status.result() == sum(i * i for i in range(50))


async def test_failures_reach_the_client_with_details(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    def explode(ctx: ActivityContext) -> None:
        raise LookupError("no such thing")

    @app.orchestration
    async def doomed(ctx: OrchestrationContext) -> None:
        await ctx.call_activity(explode)

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(doomed)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.status == "failed"
    assert status.error is not None
    assert status.error.type == "ActivityFailed"
    assert "LookupError: no such thing" in status.error.message
    with pytest.raises(OrchestrationFailed, match="no such thing"):
        status.result()


async def test_retry_policy_retries_on_durable_timers_until_success(runtime_factory: Any) -> None:
    app = Registry()
    attempts: list[int] = []

    @app.activity
    def flaky(ctx: ActivityContext) -> str:
        attempts.append(ctx.attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "finally"

    @app.orchestration
    async def persistent(ctx: OrchestrationContext) -> str:
        policy = RetryPolicy(max_attempts=5, backoff="exponential", delay=0.02, max_delay=0.05)
        return str(await ctx.call_activity(flaky, retry=policy))

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(persistent)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == "finally"
    assert len(attempts) == 3
    history = await runtime.client.read_history(instance)
    assert sum(isinstance(e, h.TimerCreated) for e in history) == 2


# -- timers, events and selects ---------------------------------------------------------------------


async def test_human_approval_event_beats_timer(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def approval(ctx: OrchestrationContext) -> str:
        ctx.set_custom_status("waiting")
        index, value = await ctx.any([ctx.wait_for_event("approved"), ctx.sleep(30)])
        return f"approved by {value}" if index == 0 else "timed out"

    runtime = await runtime_factory(app)
    client: Client = runtime.client
    instance = await client.start_orchestration(approval)
    status_value, version = await client.wait_for_status_change(instance, 0, timeout=10)
    assert (status_value, version) == ("waiting", 1)
    await client.raise_event(instance, "approved", "ann")
    status = await client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == "approved by ann"


async def test_human_approval_times_out_on_a_durable_timer(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def approval(ctx: OrchestrationContext) -> str:
        index, _ = await ctx.any([ctx.wait_for_event("approved"), ctx.sleep(0.2)])
        return "approved" if index == 0 else "timed out"

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(approval)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == "timed out"
    await runtime.client.raise_event(
        instance, "approved", None
    )  # too late: dropped, instance stays completed
    await asyncio.sleep(0.1)
    final = await runtime.client.get_status(instance)
    assert final is not None and final.result() == "timed out"


async def test_select_loser_activity_gets_the_cancel_signal(runtime_factory: Any) -> None:
    app = Registry()
    cancelled = asyncio.Event()

    @app.activity
    async def slow(ctx: ActivityContext) -> str:
        try:
            await asyncio.wait_for(ctx.wait_cancelled(), timeout=10)
        except TimeoutError:
            return "not cancelled"
        cancelled.set()
        return "stopped"

    @app.orchestration
    async def race(ctx: OrchestrationContext) -> int:
        index, _ = await ctx.any([ctx.call_activity(slow), ctx.sleep(0.1)])
        return int(index)

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(race)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == 1
    await asyncio.wait_for(cancelled.wait(), timeout=5)


# -- sub-orchestrations, continue-as-new, cancellation -----------------------------------------


async def test_sub_orchestration_results_and_failures_propagate(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def child(ctx: OrchestrationContext, n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n + 1

    @app.orchestration
    async def parent(ctx: OrchestrationContext) -> list[Any]:
        ok = await ctx.call_sub_orchestration(child, 1)
        try:
            await ctx.call_sub_orchestration(child, -1, instance_id=f"{ctx.instance_id}-neg")
        except SubOrchestrationFailed as exc:
            return [ok, exc.instance_id, exc.message]
        return [ok]

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(parent, instance_id="fam")
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == [2, "fam-neg", "negative"]
    kid = await runtime.client.get_status("fam-neg")
    assert kid is not None and kid.status == "failed" and kid.parent_instance_id == "fam"


async def test_child_continue_as_new_still_reports_to_its_parent(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def counter(ctx: OrchestrationContext, n: int) -> int:
        if n < 3:
            ctx.continue_as_new(n + 1)
        return n * 100

    @app.orchestration
    async def parent(ctx: OrchestrationContext) -> int:
        return int(await ctx.call_sub_orchestration(counter, 0))

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(parent)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == 300


async def test_eternal_orchestration_continues_as_new_with_fresh_history(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    def tick(ctx: ActivityContext, n: int) -> int:
        return n + 1

    @app.orchestration
    async def eternal(ctx: OrchestrationContext, n: int) -> int:
        n = int(await ctx.call_activity(tick, n))
        ctx.set_custom_status({"generation": ctx.execution_id})
        if n < 5:
            ctx.continue_as_new(n)
        return n

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(eternal, 0)
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == 5
    assert status.execution_id == 5
    assert status.custom_status_value() == {"generation": 5}
    latest = await runtime.client.read_history(instance)
    assert isinstance(latest[0], h.OrchestrationStarted) and latest[0].input == "4"
    first = await runtime.client.read_history(instance, 1)
    assert isinstance(first[-1], h.OrchestrationContinuedAsNew)


async def test_cancel_cascades_to_children_and_running_activities(runtime_factory: Any) -> None:
    app = Registry()
    activity_saw_cancel = asyncio.Event()
    started = asyncio.Event()

    @app.activity
    async def long_job(ctx: ActivityContext) -> None:
        started.set()
        await asyncio.wait_for(ctx.wait_cancelled(), timeout=10)
        activity_saw_cancel.set()

    @app.orchestration
    async def kid(ctx: OrchestrationContext) -> None:
        await ctx.wait_for_event("never")

    @app.orchestration
    async def boss(ctx: OrchestrationContext) -> None:
        await ctx.all(
            [ctx.call_activity(long_job), ctx.call_sub_orchestration(kid, None, instance_id="boss-kid")]
        )

    runtime = await runtime_factory(app)
    client = runtime.client
    instance = await client.start_orchestration(boss, instance_id="boss")
    await asyncio.wait_for(started.wait(), timeout=10)
    for _ in range(100):
        if await client.get_status("boss-kid") is not None:
            break
        await asyncio.sleep(0.05)
    await client.cancel(instance, "stop everything")
    status = await client.wait_for_orchestration(instance, timeout=10)
    assert status.status == "cancelled"
    assert status.error is not None and status.error.message == "stop everything"
    child = await client.wait_for_orchestration("boss-kid", timeout=10)
    assert child.status == "cancelled"
    await asyncio.wait_for(activity_saw_cancel.wait(), timeout=10)


# -- the client --------------------------------------------------------------------------------


async def test_start_policy_for_an_existing_instance_id(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def noop(ctx: OrchestrationContext) -> str:
        return "done"

    runtime = await runtime_factory(app)
    client = runtime.client
    await client.start_orchestration(noop, instance_id="same")
    await client.wait_for_orchestration("same", timeout=10)
    with pytest.raises(InstanceAlreadyExists, match="'same' already exists"):
        await client.start_orchestration(noop, instance_id="same")
    assert await client.start_orchestration(noop, instance_id="same", if_exists="ignore") == "same"


async def test_racing_starts_of_one_new_id_run_it_once(runtime_factory: Any) -> None:
    app = Registry()
    runs: list[str] = []

    @app.activity
    def record(ctx: ActivityContext, who: str) -> None:
        runs.append(who)

    @app.orchestration
    async def once(ctx: OrchestrationContext, who: str) -> str:
        await ctx.call_activity(record, who)
        return who

    runtime = await runtime_factory(app)
    await asyncio.gather(
        *(runtime.client.start_orchestration(once, f"c{i}", instance_id="dup") for i in range(3))
    )
    status = await runtime.client.wait_for_orchestration("dup", timeout=10)
    await asyncio.sleep(0.2)
    assert runs == [status.result()]


async def test_client_errors_are_clear(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def waits(ctx: OrchestrationContext) -> None:
        await ctx.wait_for_event("x")

    runtime = await runtime_factory(app)
    client = runtime.client
    assert await client.get_status("nobody") is None
    with pytest.raises(SerializationError, match="input of orchestration 'waits'"):
        await client.start_orchestration(waits, object())
    with pytest.raises(ValueError, match="instance id"):
        await client.start_orchestration(waits, instance_id="bad\x00id")
    instance = await client.start_orchestration(waits)
    with pytest.raises(TimeoutError, match="still running"):
        await client.wait_for_orchestration(instance, timeout=0.3)


async def test_unserialisable_activity_input_fails_at_the_call_site(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    def takes(ctx: ActivityContext, value: Any) -> None:
        return None

    @app.orchestration
    async def careless(ctx: OrchestrationContext) -> str:
        try:
            ctx.call_activity(takes, {"when": threading.Lock()})
        except SerializationError as exc:
            return str(exc)
        return "no error"

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(careless)
    message = (await runtime.client.wait_for_orchestration(instance, timeout=10)).result()
    assert "input of activity 'takes'" in message and "when" in message


# -- operations: wake-ups, deploys, poison, shutdown, leases ---------------------------------------


async def test_dispatchers_are_woken_by_new_work_not_a_fixed_poll(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    def one(ctx: ActivityContext) -> int:
        return 1

    @app.orchestration
    async def quick(ctx: OrchestrationContext) -> int:
        return int(await ctx.call_activity(one))

    runtime = await runtime_factory(app, poll_interval=30.0)
    if not runtime.provider.capabilities.wakeups:
        pytest.skip("provider does not declare wake-ups")
    await asyncio.sleep(0.3)  # let the dispatchers go idle
    instance = await runtime.client.start_orchestration(quick)
    status = await runtime.client.wait_for_orchestration(instance, timeout=5)
    assert status.result() == 1


async def test_unknown_orchestration_waits_for_a_deploy_that_registers_it(runtime_factory: Any) -> None:
    old = Registry()
    new = Registry()

    @new.orchestration(name="feature")
    async def feature(ctx: OrchestrationContext) -> str:
        return "shipped"

    old_runtime = await runtime_factory(old)
    instance = await old_runtime.client.start_orchestration("feature")
    await asyncio.sleep(0.5)
    assert await old_runtime.client.get_status(instance) is None  # not created, not failed
    await old_runtime.shutdown()
    new_runtime = await runtime_factory(new)
    status = await new_runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == "shipped"


async def test_unknown_activity_waits_for_a_worker_that_has_it(runtime_factory: Any) -> None:
    orchestrator_only = Registry()
    with_worker = Registry()

    @orchestrator_only.orchestration
    async def needs(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity("remote_step", "x"))

    @with_worker.activity(name="remote_step")
    def remote(ctx: ActivityContext, value: str) -> str:
        return value.upper()

    # Both workers race for the item once it is registered; enough attempts that the one that
    # lacks the activity cannot plausibly win every race before the deploy lands.
    first = await runtime_factory(orchestrator_only, max_attempts=50)
    instance = await first.client.start_orchestration(needs)
    await asyncio.sleep(0.4)
    status = await first.client.get_status(instance)
    assert status is not None and status.status == "running"
    await runtime_factory(with_worker, max_attempts=50)
    assert (await first.client.wait_for_orchestration(instance, timeout=10)).result() == "X"


class InflatedAttempts(Provider):
    """Wraps a provider and reports every fetch as if it had been retried ``extra`` more times."""

    def __init__(
        self, inner: Provider, extra: int, *, orchestrations: bool = True, activities: bool = True
    ) -> None:
        self.inner = inner
        self.extra = extra
        self.orchestrations = orchestrations
        self.activities = activities
        self.name = inner.name

    @property
    def capabilities(self) -> Any:
        return self.inner.capabilities

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        items = await self.inner.fetch_orchestration_items(limit, lock_timeout)
        for item in items:
            if self.orchestrations and item.instance is not None:  # let the start through
                item.attempt_count += self.extra
        return items

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        leases = await self.inner.fetch_work_items(limit, lock_timeout)
        for lease in leases:
            if self.activities:
                lease.attempt_count += self.extra
        return leases

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ack_orchestration_items(self, acks: Sequence[Any]) -> Any:
        return await self.inner.ack_orchestration_items(acks)

    async def abandon_orchestration_item(self, lock_token: str, **kw: Any) -> None:
        await self.inner.abandon_orchestration_item(lock_token, **kw)

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        await self.inner.renew_orchestration_lock(lock_token, lock_timeout)

    async def ack_work_items(self, acks: Sequence[Any]) -> Any:
        return await self.inner.ack_work_items(acks)

    async def abandon_work_item(self, lock_token: str, **kw: Any) -> None:
        await self.inner.abandon_work_item(lock_token, **kw)

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        return await self.inner.renew_work_item_locks(lock_tokens, lock_timeout)

    async def enqueue_orchestrator_messages(self, messages: Sequence[h.Message]) -> None:
        await self.inner.enqueue_orchestrator_messages(messages)

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[h.Event]:
        return await self.inner.read_history(instance_id, execution_id)

    async def get_instance(self, instance_id: str) -> Any:
        return await self.inner.get_instance(instance_id)

    async def wait_for_work(self, queue: Any, timeout: float) -> None:
        await self.inner.wait_for_work(queue, timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        await self.inner.wait_for_instance_change(instance_id, timeout)


async def test_poison_activity_fails_its_call_instead_of_looping(
    provider: Provider, mode: dict[str, Any]
) -> None:
    app = Registry()

    @app.activity
    def never_runs(ctx: ActivityContext) -> None:
        raise AssertionError("a poisoned activity must not run")

    @app.orchestration
    async def victim(ctx: OrchestrationContext) -> str:
        try:
            await ctx.call_activity(never_runs)
        except ActivityFailed as exc:
            return f"{exc.details.kind}:{exc.type_name}"
        return "ran"

    inflated = InflatedAttempts(provider, 100, orchestrations=False)
    # Inflated fetches only: a lease handed over directly by an ack is always a first attempt.
    async with Runtime(inflated, app, options(mode, max_attempts=5, direct_dispatch=False)) as runtime:
        instance = await runtime.client.start_orchestration(victim)
        status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == "poison:PoisonMessage"


async def test_poison_orchestration_is_failed_with_details(provider: Provider, mode: dict[str, Any]) -> None:
    app = Registry()

    @app.orchestration
    async def waits(ctx: OrchestrationContext) -> None:
        await ctx.wait_for_event("go")

    inflated = InflatedAttempts(provider, 100, activities=False)
    async with Runtime(inflated, app, options(mode, max_attempts=5)) as runtime:
        instance = await runtime.client.start_orchestration(waits)
        for _ in range(100):
            if await runtime.client.get_status(instance) is not None:
                break
            await asyncio.sleep(0.05)
        await runtime.client.raise_event(instance, "go")
        status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.status == "failed"
    assert status.error is not None
    assert (status.error.kind, status.error.type) == ("poison", "PoisonMessage")
    assert "RaiseEvent" in status.error.message


async def test_long_activity_keeps_its_lease_and_runs_once(runtime_factory: Any) -> None:
    app = Registry()
    runs: Counter[str] = Counter()

    @app.activity
    async def long_one(ctx: ActivityContext) -> str:
        runs[ctx.instance_id] += 1
        await asyncio.sleep(1.0)
        return "done"

    @app.orchestration
    async def patient(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity(long_one))

    first = await runtime_factory(app, activity_lock_timeout=0.3)
    await runtime_factory(app, activity_lock_timeout=0.3)  # a second worker that would steal a lapsed lease
    instance = await first.client.start_orchestration(patient)
    assert (await first.client.wait_for_orchestration(instance, timeout=10)).result() == "done"
    assert runs[instance] == 1


async def test_graceful_shutdown_lets_in_flight_activities_finish(
    provider: Provider, mode: dict[str, Any]
) -> None:
    app = Registry()
    finished = threading.Event()
    started = threading.Event()

    @app.activity
    def work(ctx: ActivityContext) -> str:
        started.set()
        ctx.wait_cancelled_sync(0.5)
        finished.set()
        return "finished"

    @app.orchestration
    async def job(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity(work))

    runtime = Runtime(provider, app, options(mode))
    await runtime.start()
    instance = await runtime.client.start_orchestration(job)
    await asyncio.to_thread(started.wait, 10)
    await runtime.shutdown(timeout=5)
    assert finished.is_set()
    async with Runtime(provider, app, options(mode)) as again:
        assert (await again.client.wait_for_orchestration(instance, timeout=10)).result() == "finished"


async def test_shutdown_timeout_cancels_and_releases_stuck_activities(
    provider: Provider, mode: dict[str, Any]
) -> None:
    app = Registry()
    attempts: list[int] = []
    saw_cancel = asyncio.Event()

    @app.activity
    async def stubborn(ctx: ActivityContext) -> str:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            await ctx.wait_cancelled()
            saw_cancel.set()
            await asyncio.sleep(30)
        return "second try"

    @app.orchestration
    async def job(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity(stubborn))

    runtime = Runtime(provider, app, options(mode))
    await runtime.start()
    instance = await runtime.client.start_orchestration(job)
    for _ in range(200):
        if attempts:
            break
        await asyncio.sleep(0.02)
    await runtime.shutdown(timeout=0.2)
    assert saw_cancel.is_set()
    async with Runtime(provider, app, options(mode)) as again:
        assert (await again.client.wait_for_orchestration(instance, timeout=10)).result() == "second try"
    assert len(attempts) == 2


async def test_results_identical_in_every_mode(provider: Provider) -> None:
    app = Registry()

    @app.activity
    def double(ctx: ActivityContext, n: int) -> int:
        return 2 * n

    @app.orchestration
    async def mixed(ctx: OrchestrationContext, n: int) -> list[Any]:
        guid = str(ctx.new_guid())
        values = await ctx.all([ctx.call_activity(double, i) for i in range(n)])
        index, _ = await ctx.any([ctx.sleep(0.01), ctx.wait_for_event("x")])
        return [guid, values, index, ctx.random()]

    results, shapes = [], []
    for name, mode in MODES.items():
        async with Runtime(provider, app, options(mode)) as runtime:
            instance = await runtime.client.start_orchestration(mixed, 5, instance_id=f"same-{name}")
            status = await runtime.client.wait_for_orchestration(instance, timeout=10)
            results.append(status.result()[1:3])
            shapes.append([e.TYPE for e in await runtime.client.read_history(instance)])
    assert all(shape == shapes[0] for shape in shapes)
    assert all(result == [[0, 2, 4, 6, 8], 0] for result in results)


async def test_pydantic_models_as_inputs_and_results(runtime_factory: Any) -> None:
    app = Registry()

    @app.activity
    def quote(ctx: ActivityContext, items: list[Item]) -> Quote:
        assert all(isinstance(i, Item) for i in items)
        return Quote(total=sum(i.price for i in items), items=items)

    @app.orchestration
    async def pricing(ctx: OrchestrationContext, items: list[Item]) -> Quote:
        result = await ctx.call_activity(quote, items)
        assert isinstance(result, Quote)
        return result

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(
        pricing, [Item(sku="a", price=1.5), Item(sku="b", price=2)]
    )
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result(Quote) == Quote(total=3.5, items=[Item(sku="a", price=1.5), Item(sku="b", price=2)])


async def test_running_instances_keep_their_version_when_a_new_one_is_deployed(runtime_factory: Any) -> None:
    v1 = Registry()
    both = Registry()

    async def flow_v1(ctx: OrchestrationContext) -> str:
        await ctx.wait_for_event("go")
        return "v1"

    async def flow_v2(ctx: OrchestrationContext) -> str:
        await ctx.sleep(0.01)
        await ctx.wait_for_event("go")
        return "v2"

    v1.orchestration(name="flow", version="1")(flow_v1)
    both.orchestration(name="flow", version="1")(flow_v1)
    both.orchestration(name="flow", version="2")(flow_v2)

    old = await runtime_factory(v1)
    instance = await old.client.start_orchestration("flow")  # no version: pins the latest it runs
    for _ in range(100):
        if await old.client.get_status(instance) is not None:
            break
        await asyncio.sleep(0.05)
    await old.shutdown()
    new = await runtime_factory(both)
    fresh = await new.client.start_orchestration("flow")
    await new.client.raise_event(instance, "go")
    assert (await new.client.wait_for_orchestration(instance, timeout=10)).result() == "v1"
    for _ in range(100):
        status = await new.client.get_status(fresh)
        if status is not None and status.version == "2":
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    await new.client.raise_event(fresh, "go")
    done = await new.client.wait_for_orchestration(fresh, timeout=10)
    assert (done.result(), done.version) == ("v2", "2")


async def test_a_child_id_that_is_taken_fails_the_call_instead_of_hanging(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def child(ctx: OrchestrationContext) -> str:
        return "child"

    @app.orchestration
    async def parent(ctx: OrchestrationContext) -> str:
        try:
            await ctx.call_sub_orchestration(child, instance_id="taken")
        except SubOrchestrationFailed as exc:
            return exc.type_name
        return "ran"

    runtime = await runtime_factory(app)
    await runtime.client.start_orchestration(child, instance_id="taken")
    await runtime.client.wait_for_orchestration("taken", timeout=10)
    instance = await runtime.client.start_orchestration(parent)
    assert (
        await runtime.client.wait_for_orchestration(instance, timeout=10)
    ).result() == "InstanceAlreadyExists"


async def test_an_event_for_an_unknown_instance_leaves_no_trace(runtime_factory: Any) -> None:
    app = Registry()

    @app.orchestration
    async def later(ctx: OrchestrationContext) -> str:
        return "started fine"

    runtime = await runtime_factory(app)
    await runtime.client.raise_event("order-1", "paid", 1)
    await runtime.client.cancel("order-1")
    await asyncio.sleep(0.5)  # the runtime consumes both messages
    assert await runtime.client.get_status("order-1") is None
    await runtime.client.start_orchestration(later, instance_id="order-1")
    assert (await runtime.client.wait_for_orchestration("order-1", timeout=10)).result() == "started fine"


# -- direct dispatch: held instances ------------------------------------------------------------


async def test_a_chain_of_quick_activities_still_takes_a_cancel(runtime_factory: Any) -> None:
    """A held instance lets go when a message waits, so a cancel is never starved by quick steps."""
    app = Registry()
    runs: list[int] = []

    @app.activity
    def quick(ctx: ActivityContext, i: int) -> int:
        runs.append(i)
        return i

    @app.orchestration
    async def endless(ctx: OrchestrationContext) -> None:
        for i in range(1_000_000):
            await ctx.call_activity(quick, i)

    runtime = await runtime_factory(app)
    instance = await runtime.client.start_orchestration(endless)
    for _ in range(1000):
        if len(runs) >= 50:
            break
        await asyncio.sleep(0.01)
    await runtime.client.cancel(instance, "enough")
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.status == "cancelled"
    ran = len(runs)
    await asyncio.sleep(0.2)
    assert len(runs) <= ran + 1  # at most the step that was in flight


async def test_a_held_instance_is_released_when_its_activity_turns_slow(runtime_factory: Any) -> None:
    """An activity that outlasts the hold releases its instance: an event gets a turn meanwhile.

    (Nothing waits for the event, so it is only recorded; what matters is when.)
    """
    app = Registry()
    slow_started = threading.Event()
    finish_slow = threading.Event()

    @app.activity
    def step(ctx: ActivityContext, i: int) -> int:
        if i == 3:
            slow_started.set()
            finish_slow.wait(10)
        return i

    @app.orchestration
    async def flow(ctx: OrchestrationContext) -> list[int]:
        return [await ctx.call_activity(step, i) for i in range(4)]

    runtime = await runtime_factory(app, hold_instance=0.05)
    instance = await runtime.client.start_orchestration(flow)
    await asyncio.get_running_loop().run_in_executor(None, slow_started.wait, 10)
    await runtime.client.raise_event(instance, "note", 9)
    for _ in range(200):  # the event is recorded while the slow activity still runs
        if any(isinstance(e, h.EventRaised) for e in await runtime.client.read_history(instance)):
            break
        await asyncio.sleep(0.02)
    finish_slow.set()
    status = await runtime.client.wait_for_orchestration(instance, timeout=10)
    assert status.result() == [0, 1, 2, 3]
    kinds = [type(e) for e in await runtime.client.read_history(instance)]
    raised = kinds.index(h.EventRaised)
    last_result = len(kinds) - 1 - kinds[::-1].index(h.ActivityCompleted)
    assert raised < last_result, "the event waited for the held instance's slow activity"
