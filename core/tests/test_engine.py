"""Unit tests of the replay engine, driven turn by turn with a controllable clock."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from harness import Harness, kinds, timers

from perdure import history as h
from perdure.context import ActivityContext, OrchestrationContext
from perdure.errors import ActivityFailed, NondeterminismError, SubOrchestrationFailed, TaskCancelled
from perdure.provider import decode_error
from perdure.registry import Registry
from perdure.retry import RetryPolicy
from perdure.serialization import loads

app = Registry()


@app.activity
def add(ctx: ActivityContext, pair: list[int]) -> int:
    return pair[0] + pair[1]


@app.activity
def step(ctx: ActivityContext, name: str) -> str:
    return name


@dataclass
class Point:
    x: int
    y: int


@app.activity
def make_point(ctx: ActivityContext, x: int) -> Point:
    return Point(x, x)


def harness(fn: Any, **kw: Any) -> Harness:
    registry = Registry()
    registry.activity(add)
    registry.activity(step)
    registry.activity(make_point)
    registry.orchestration(fn)
    return Harness(registry, fn.__name__, **kw)


# -- basics ------------------------------------------------------------------------------------


def test_first_turn_records_start_and_schedules_the_first_activity() -> None:
    async def sequence(ctx: OrchestrationContext, n: int) -> int:
        a = await ctx.call_activity(add, [n, 1])
        b = await ctx.call_activity(add, [a, 1])
        return int(b)

    t = harness(sequence)
    first = t.start(1)
    assert kinds(first) == ["OrchestrationStarted", "ActivityScheduled"]
    assert first.status == "running"
    (item,) = first.worker_items
    assert (item.name, item.input, item.activity_id) == ("add", "[1,1]", 2)
    second = t.turn(t.complete(item, 2))
    assert kinds(second) == ["ActivityCompleted", "ActivityScheduled"]
    assert second.status is None
    third = t.turn(t.complete(second.worker_items[0], 3))
    assert third.status == "completed"
    assert third.output == "3"
    assert kinds(third)[-1] == "OrchestrationCompleted"


def test_results_are_decoded_to_the_activity_return_annotation() -> None:
    seen: list[Any] = []

    async def typed(ctx: OrchestrationContext) -> int:
        point = await ctx.call_activity(make_point, 4)
        seen.append(point)
        return int(point.x)

    t = harness(typed, check_replay=False)
    item = t.start().worker_items[0]
    done = t.turn(t.complete(item, {"x": 4, "y": 4}))
    assert done.output == "4"
    assert seen == [Point(4, 4)]


def test_activity_failure_is_catchable_with_original_type_and_message() -> None:
    async def catches(ctx: OrchestrationContext) -> str:
        try:
            await ctx.call_activity(step, "x")
        except ActivityFailed as exc:
            return f"{exc.activity}:{exc.type_name}:{exc.message}"
        return "no error"

    t = harness(catches)
    item = t.start().worker_items[0]
    done = t.turn(t.fail(item, "KeyError", "missing"))
    assert loads(done.output or "") == "step:KeyError:missing"


def test_uncaught_exception_fails_the_orchestration_with_traceback() -> None:
    async def broken(ctx: OrchestrationContext) -> None:
        await ctx.call_activity(step, "x")
        raise RuntimeError("bad state")

    t = harness(broken)
    item = t.start().worker_items[0]
    done = t.turn(t.complete(item, "x"))
    assert done.status == "failed"
    details = decode_error(done.output or "")
    assert (details.kind, details.type, details.message) == ("application", "RuntimeError", "bad state")
    assert details.traceback and "broken" in details.traceback


# -- joins and selects ---------------------------------------------------------------------------


def test_all_returns_results_in_argument_order_not_completion_order() -> None:
    async def fan(ctx: OrchestrationContext) -> list[str]:
        return await ctx.all([ctx.call_activity(step, f"s{i}") for i in range(3)])

    t = harness(fan)
    items = t.start().worker_items
    assert len(items) == 3
    t.turn(t.complete(items[2], "c"))
    t.turn(t.complete(items[0], "a"))
    done = t.turn(t.complete(items[1], "b"))
    assert loads(done.output or "") == ["a", "b", "c"]


def test_all_fails_with_the_first_failure_in_history_order() -> None:
    async def fan(ctx: OrchestrationContext) -> str:
        try:
            await ctx.all([ctx.call_activity(step, "a"), ctx.call_activity(step, "b")])
        except ActivityFailed as exc:
            return exc.message
        return "ok"

    t = harness(fan)
    a, b = t.start().worker_items
    done = t.turn(t.fail(b, message="second"), t.fail(a, message="first"))
    assert loads(done.output or "") == "second"


def test_all_with_return_exceptions_returns_failures_in_place() -> None:
    async def fan(ctx: OrchestrationContext) -> list[str]:
        results = await ctx.all(
            [ctx.call_activity(step, "a"), ctx.call_activity(step, "b")], return_exceptions=True
        )
        return [r if isinstance(r, str) else type(r).__name__ for r in results]

    t = harness(fan)
    a, b = t.start().worker_items
    done = t.turn(t.fail(a), t.complete(b, "B"))
    assert loads(done.output or "") == ["ActivityFailed", "B"]


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_any_resolves_by_history_order_and_cancels_the_loser(order: str) -> None:
    async def race(ctx: OrchestrationContext) -> list[Any]:
        index, value = await ctx.any([ctx.call_activity(step, "a"), ctx.call_activity(step, "b")])
        return [index, value]

    t = harness(race)
    a, b = t.start().worker_items
    messages = [t.complete(a, "A"), t.complete(b, "B")]
    if order == "ba":
        messages.reverse()
    done = t.turn(*messages)
    winner = 0 if order == "ab" else 1
    assert loads(done.output or "") == [winner, "AB"[winner]]
    loser = (b, a)[winner]
    assert done.cancelled_activities == [
        h.ActivityRef(loser.instance_id, loser.execution_id, loser.activity_id)
    ]
    cancels = [e for e in done.new_events if isinstance(e, h.ActivityCancelled)]
    assert [c.target_id for c in cancels] == [loser.activity_id]


def test_any_timer_versus_event_approval_with_timeout() -> None:
    async def approval(ctx: OrchestrationContext) -> str:
        index, value = await ctx.any([ctx.wait_for_event("approve"), ctx.sleep(3600)])
        return f"approved by {value}" if index == 0 else "timed out"

    t = harness(approval)
    first = t.start()
    (timer,) = timers(first)
    assert timer.fire_at_ms == t.now_ms + 3_600_000
    done = t.turn(t.raise_event("approve", "ann"), advance_ms=10)
    assert loads(done.output or "") == "approved by ann"
    late = harness(approval)
    (timer,) = timers(late.start())
    timed_out = late.turn(timer, advance_ms=3_600_000)
    assert loads(timed_out.output or "") == "timed out"
    assert "EventSubscriptionCancelled" in kinds(timed_out)


def test_any_races_a_two_step_async_block_against_a_timer_and_cancels_the_block() -> None:
    async def two_steps(ctx: OrchestrationContext) -> str:
        first = await ctx.call_activity(step, "one")
        second = await ctx.call_activity(step, "two")
        return f"{first}+{second}"

    async def race(ctx: OrchestrationContext) -> str:
        index, value = await ctx.any([two_steps(ctx), ctx.sleep(10)])
        return str(value) if index == 0 else "timeout"

    t = harness(race)
    first = t.start()
    (one,) = first.worker_items
    (timer,) = timers(first)
    mid = t.turn(t.complete(one, "1"))
    (two,) = mid.worker_items
    done = t.turn(timer, t.complete(two, "2"), advance_ms=10_000)
    assert loads(done.output or "") == "timeout"
    assert done.cancelled_activities == [h.ActivityRef(two.instance_id, two.execution_id, two.activity_id)]

    fast = harness(race)
    first = fast.start()
    (one,) = first.worker_items
    (two,) = fast.turn(fast.complete(one, "1")).worker_items
    assert loads(fast.turn(fast.complete(two, "2")).output or "") == "1+2"


def test_all_of_ten_helpers_each_with_its_own_retries() -> None:
    policy = RetryPolicy(max_attempts=3, backoff="fixed", delay=1)

    async def helper(ctx: OrchestrationContext, i: int) -> str:
        value = await ctx.call_activity(step, f"h{i}", retry=policy)
        return f"{value}!"

    async def join(ctx: OrchestrationContext) -> list[str]:
        return await ctx.all([helper(ctx, i) for i in range(10)])

    t = harness(join)
    items = t.start().worker_items
    assert [i.input for i in items] == [f'"h{i}"' for i in range(10)]
    # every odd helper fails once and is retried after its durable timer
    retry = t.turn(*[t.fail(i) if n % 2 else t.complete(i, f"v{n}") for n, i in enumerate(items)])
    assert len(timers(retry)) == 5
    again = t.turn(*timers(retry), advance_ms=1000)
    assert len(again.worker_items) == 5
    done = t.turn(*[t.complete(i, f"w{i.input}") for i in again.worker_items])
    out = loads(done.output or "")
    assert out[0] == "v0!" and out[1] == 'w"h1"!' and len(out) == 10


def test_awaiting_a_cancelled_loser_raises_task_cancelled() -> None:
    async def race(ctx: OrchestrationContext) -> str:
        slow = ctx.call_activity(step, "slow")
        await ctx.any([slow, ctx.sleep(1)])
        try:
            await slow
        except TaskCancelled:
            return "cancelled"
        return "not cancelled"

    t = harness(race)
    (timer,) = timers(t.start())
    assert loads(t.turn(timer, advance_ms=1000).output or "") == "cancelled"


# -- non-durable awaits and nondeterminism ------------------------------------------------------


async def test_awaiting_asyncio_sleep_fails_with_the_durable_alternative() -> None:
    # inside a running loop, as in the runtime: asyncio.sleep yields an asyncio future
    async def sleepy(ctx: OrchestrationContext) -> None:
        await asyncio.sleep(1)

    t = harness(sleepy)
    done = t.start()
    assert done.status == "failed"
    details = decode_error(done.output or "")
    assert details.type == "NonDurableAwait"
    assert "instead of asyncio.sleep" in details.message
    assert "await asyncio.sleep(1)" in (details.traceback or "")


def test_changed_activity_name_is_reported_as_nondeterminism_with_both_sides() -> None:
    async def flow(ctx: OrchestrationContext) -> str:
        await ctx.call_activity(step, "a")
        return str(await ctx.call_activity(step, "b"))

    t = harness(flow)
    item = t.start().worker_items[0]
    t.turn(t.complete(item, "A"))

    async def flow_v2(ctx: OrchestrationContext) -> str:
        await ctx.call_activity(step, "a")
        return str(await ctx.call_activity(add, [1, 2]))

    registry = Registry()
    registry.activity(step)
    registry.activity(add)
    registry.orchestration(name="flow")(flow_v2)
    changed = Harness(registry, "flow", history=list(t.history))
    with pytest.raises(NondeterminismError) as info:
        changed.replay_fresh()
    message = str(info.value)
    assert "'flow'" in message and "inst-1" in message
    assert "event 4" in message
    assert "'add'" in message and "'step'" in message
    assert "version" in message


def test_history_decision_without_matching_code_is_nondeterminism() -> None:
    async def flow(ctx: OrchestrationContext) -> None:
        await ctx.call_activity(step, "a")

    t = harness(flow)
    t.start()

    async def nothing(ctx: OrchestrationContext) -> None:
        await ctx.wait_for_event("never")

    registry = Registry()
    registry.orchestration(name="flow")(nothing)
    with pytest.raises(NondeterminismError, match="history records activity 'step'"):
        Harness(registry, "flow", history=list(t.history)).replay_fresh()


def test_corrupt_event_ids_are_reported() -> None:
    async def flow(ctx: OrchestrationContext) -> None:
        await ctx.call_activity(step, "a")

    t = harness(flow)
    t.start()
    broken = [t.history[0], h.ActivityScheduled(event_id=5, timestamp_ms=0, name="step", input='"a"')]
    with pytest.raises(NondeterminismError, match="expected event 2, found event 5"):
        Harness(t.registry, "flow", history=broken).replay_fresh()


# -- retries and timers on the controllable clock ---------------------------------------------


def test_exponential_backoff_waits_on_durable_timers_with_cap() -> None:
    policy = RetryPolicy(max_attempts=4, backoff="exponential", delay=2, multiplier=3, max_delay=10)

    async def retried(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity(step, "x", retry=policy))

    t = harness(retried)
    item = t.start().worker_items[0]
    waits = []
    for _ in range(3):
        turn = t.turn(t.fail(item))
        (timer,) = timers(turn)
        waits.append(timer.fire_at_ms - t.now_ms)
        t.now_ms = timer.fire_at_ms
        item = t.turn(timer).worker_items[0]
    assert waits == [2000, 6000, 10000]
    assert t.turn(t.complete(item, "ok")).output == '"ok"'


def test_retry_gives_up_after_max_attempts_and_skips_non_retryable_types() -> None:
    policy = RetryPolicy(max_attempts=2, backoff="none", non_retryable=["PermissionError"])

    async def retried(ctx: OrchestrationContext) -> str:
        try:
            await ctx.call_activity(step, "x", retry=policy)
        except ActivityFailed as exc:
            return exc.type_name
        return "ok"

    t = harness(retried)
    item = t.start().worker_items[0]
    second = t.turn(t.fail(item))
    assert not timers(second) and len(second.worker_items) == 1
    done = t.turn(t.fail(second.worker_items[0], "IOError"))
    assert loads(done.output or "") == "IOError"

    u = harness(retried)
    item = u.start().worker_items[0]
    assert loads(u.turn(u.fail(item, "PermissionError")).output or "") == "PermissionError"


def test_per_attempt_timeout_cancels_the_attempt_and_retries() -> None:
    policy = RetryPolicy(max_attempts=2, backoff="none", timeout=5)

    async def bounded(ctx: OrchestrationContext) -> str:
        return str(await ctx.call_activity(step, "x", retry=policy))

    t = harness(bounded)
    first = t.start()
    (item,) = first.worker_items
    (timeout,) = timers(first)
    assert timeout.fire_at_ms == t.now_ms + 5000
    retry = t.turn(timeout, advance_ms=5000)
    assert retry.cancelled_activities == [
        h.ActivityRef(item.instance_id, item.execution_id, item.activity_id)
    ]
    (again,) = retry.worker_items
    assert loads(t.turn(t.complete(again, "late but fine")).output or "") == "late but fine"
    stale = t.turn(t.complete(item, "too late"))
    assert stale.new_events == []


def test_utc_now_is_the_time_of_the_event_being_processed() -> None:
    seen: list[datetime] = []

    async def clock(ctx: OrchestrationContext) -> None:
        seen.append(ctx.utc_now())
        await ctx.sleep(60)
        seen.append(ctx.utc_now())

    t = harness(clock, check_replay=False)
    (timer,) = timers(t.start())
    start = t.now_ms
    t.turn(timer, advance_ms=61_000)
    assert seen == [
        datetime.fromtimestamp(start / 1000, UTC),
        datetime.fromtimestamp((start + 61_000) / 1000, UTC),
    ]
    seen.clear()
    t.replay_fresh()
    assert seen[0] == datetime.fromtimestamp(start / 1000, UTC)


def test_guid_and_random_repeat_on_replay_and_differ_per_instance() -> None:
    seen: list[Any] = []

    async def values(ctx: OrchestrationContext) -> None:
        seen.append((ctx.new_guid(), ctx.new_guid(), ctx.random()))
        await ctx.wait_for_event("x")

    t = harness(values, check_replay=False)
    t.start()
    t.replay_fresh()
    other = harness(values, instance_id="inst-2", check_replay=False)
    other.start()
    assert seen[0] == seen[1]
    assert seen[0][0] != seen[0][1]
    assert seen[2] != seen[0]


# -- events, children, lifecycle ---------------------------------------------------------------


def test_events_are_positional_and_an_event_nobody_waits_for_is_not_delivered() -> None:
    async def two_waits(ctx: OrchestrationContext) -> list[str]:
        first = await ctx.wait_for_event("go")
        await ctx.call_activity(step, "between")
        second = await ctx.wait_for_event("go")
        return [first, second]

    t = harness(two_waits)
    t.start()
    mid = t.turn(t.raise_event("go", "one"), t.raise_event("go", "lost"))
    (item,) = mid.worker_items
    t.turn(t.complete(item, "x"))
    done = t.turn(t.raise_event("go", "two"))
    assert loads(done.output or "") == ["one", "two"]


def test_sub_orchestration_start_carries_parent_ref_and_results_propagate() -> None:
    async def parent(ctx: OrchestrationContext) -> str:
        try:
            return str(await ctx.call_sub_orchestration("child", 5))
        except SubOrchestrationFailed as exc:
            return f"child {exc.instance_id} failed: {exc.message}"

    t = harness(parent)
    first = t.start()
    (start,) = [m for m in first.orchestrator_items if isinstance(m, h.StartOrchestration)]
    assert start.name == "child" and start.input == "5"
    assert start.instance_id == "inst-1:2"
    assert start.parent == h.ParentRef("inst-1", 1, 2)
    done = t.turn(
        h.SubOrchestrationError(
            instance_id="inst-1",
            execution_id=1,
            source_id=2,
            error=h.ErrorDetails("application", "ValueError", "nope"),
        )
    )
    assert loads(done.output or "") == "child inst-1:2 failed: nope"


def test_child_reports_its_outcome_to_the_parent() -> None:
    async def child(ctx: OrchestrationContext, n: int) -> int:
        return n * 2

    t = harness(child)
    done = t.start(21, parent=h.ParentRef("p", 3, 7))
    assert done.status == "completed"
    assert done.orchestrator_items == [
        h.SubOrchestrationResult(instance_id="p", execution_id=3, source_id=7, result="42")
    ]


def test_continue_as_new_ends_the_execution_and_carries_custom_status() -> None:
    async def eternal(ctx: OrchestrationContext, n: int) -> None:
        ctx.set_custom_status({"n": n})
        await ctx.sleep(1)
        ctx.continue_as_new(n + 1)

    t = harness(eternal)
    first = t.start(1)
    assert first.custom_status_changed and first.custom_status == '{"n":1}'
    done = t.turn(*timers(first), advance_ms=1000)
    assert done.status == "continued_as_new"
    (nxt,) = [m for m in done.orchestrator_items if isinstance(m, h.ContinueAsNew)]
    assert (nxt.execution_id, nxt.input, nxt.initial_custom_status) == (2, "2", '{"n":1}')
    assert kinds(done)[-1] == "OrchestrationContinuedAsNew"


def test_cancel_request_ends_instance_and_cancels_activities_and_children() -> None:
    async def busy(ctx: OrchestrationContext) -> None:
        await ctx.all([ctx.call_activity(step, "a"), ctx.call_sub_orchestration("kid", None)])

    t = harness(busy)
    first = t.start()
    (item,) = first.worker_items
    done = t.turn(h.CancelInstance(instance_id="inst-1", reason="user said stop"))
    assert done.status == "cancelled"
    assert done.cancelled_activities == [h.ActivityRef("inst-1", 1, item.activity_id)]
    assert (
        h.CancelInstance(instance_id="inst-1:3", reason="parent orchestration ended")
        in done.orchestrator_items
    )
    assert kinds(done)[-1] == "OrchestrationCancelled"
    details = decode_error(done.output or "")
    assert (details.kind, details.message) == ("cancelled", "user said stop")


def test_stale_and_duplicate_messages_are_dropped() -> None:
    async def one(ctx: OrchestrationContext) -> str:
        await ctx.call_activity(step, "a")
        return str(await ctx.wait_for_event("e"))

    t = harness(one)
    (item,) = t.start().worker_items
    result = t.complete(item, "A")
    other_execution = h.ActivityResult(instance_id="inst-1", execution_id=9, source_id=2, result='"x"')
    turn = t.turn(result, result, other_execution)
    assert kinds(turn) == ["ActivityCompleted", "EventSubscribed"]
    assert len(turn.dropped) == 2


def test_replay_safe_logger_logs_only_live(caplog: pytest.LogCaptureFixture) -> None:
    async def chatty(ctx: OrchestrationContext) -> None:
        ctx.logger.warning("step one")
        await ctx.wait_for_event("x")

    t = harness(chatty, check_replay=False)
    with caplog.at_level(logging.WARNING, logger="perdure.orchestration"):
        t.start()
        t.replay_fresh()
    assert [r.getMessage() for r in caplog.records].count("step one") == 1


def test_an_oversized_orchestration_result_fails_with_the_limit() -> None:
    async def huge(ctx: OrchestrationContext) -> str:
        return "x" * (3 * 1024 * 1024)

    t = harness(huge)
    done = t.start()
    assert done.status == "failed"
    details = decode_error(done.output or "")
    assert details.type == "LimitExceeded" and "result of orchestration 'huge'" in details.message
