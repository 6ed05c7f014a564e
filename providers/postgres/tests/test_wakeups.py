"""LISTEN/NOTIFY wake-ups across provider objects (separate connections, as separate processes
would have), timers, the listener's self-healing, and the in-process wake-up hub."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from pg_helpers import LEASE, empty_ack, event, eventually, first_ack, now_ms, start

from perdure.history import TimerElapsed
from perdure_postgres import PostgresProvider
from perdure_postgres._wakeups import WakeHub, channel_names, make_payloads

#: An idle waiter must wake within this many seconds of a commit in another provider object.
WAKE_BOUND = 0.25


async def timed_wait(provider: PostgresProvider, queue: Any, timeout: float = 10.0) -> asyncio.Task[float]:
    """Start a waiter; its task returns the monotonic time at which it woke."""

    async def waiter() -> float:
        await provider.wait_for_work(queue, timeout)
        return time.monotonic()

    await provider.wait_for_work(queue, 0)  # consume any earlier signal (a spurious wake is allowed)
    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0.05)  # let it block
    assert not task.done(), "the waiter returned before anything happened"
    return task


async def test_idle_waiter_wakes_on_enqueue_from_another_provider(make_provider: Any) -> None:
    producer = await make_provider()
    consumer = await make_provider()
    latencies = []
    for k in range(5):
        waiter = await timed_wait(consumer, "orchestrator")
        sent = time.monotonic()
        await producer.enqueue_orchestrator_messages([start(f"i{k}")])
        woke = await asyncio.wait_for(waiter, 5)
        latencies.append(woke - sent)
        [item] = await consumer.fetch_orchestration_items(1, LEASE)
        await consumer.abandon_orchestration_item(item.lock_token, delay=3600)
    assert max(latencies) < WAKE_BOUND, latencies


async def test_worker_waiter_wakes_on_a_turn_scheduling_activities(make_provider: Any) -> None:
    orchestrator = await make_provider()
    worker = await make_provider()
    await orchestrator.enqueue_orchestrator_messages([start("a")])
    [item] = await orchestrator.fetch_orchestration_items(1, LEASE)
    waiter = await timed_wait(worker, "worker")
    sent = time.monotonic()
    assert await orchestrator.ack_orchestration_items([first_ack(item, activities=1)]) == [None]
    assert await asyncio.wait_for(waiter, 5) - sent < WAKE_BOUND
    assert len(await worker.fetch_work_items(5, LEASE)) == 1


async def test_a_timer_from_another_provider_wakes_the_waiter_when_due(make_provider: Any) -> None:
    producer = await make_provider()
    consumer = await make_provider()
    waiter = await timed_wait(consumer, "orchestrator")
    due = now_ms() + 400
    sent = time.monotonic()
    await producer.enqueue_orchestrator_messages(
        [TimerElapsed(instance_id="t", execution_id=1, source_id=2, fire_at_ms=due)]
    )
    # The notification says "a timer at <due>": nothing to do now, so the waiter keeps waiting...
    await asyncio.sleep(0.15)
    assert not waiter.done()
    # ... and wakes when it is due.
    woke = await asyncio.wait_for(waiter, 5)
    assert 0.35 <= woke - sent < 0.4 + WAKE_BOUND
    [item] = await consumer.fetch_orchestration_items(1, LEASE)
    assert item.instance_id == "t"


async def test_a_local_timer_wakes_the_waiter_when_due(pg_provider: PostgresProvider) -> None:
    await pg_provider.enqueue_orchestrator_messages([start("a")])
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    due = now_ms() + 300
    ack = first_ack(
        item, orchestrator_items=[TimerElapsed(instance_id="a", execution_id=1, source_id=2, fire_at_ms=due)]
    )
    await pg_provider.wait_for_work("orchestrator", 0)  # consume the enqueue's own signal
    assert await pg_provider.ack_orchestration_items([ack]) == [None]
    started = time.monotonic()
    await pg_provider.wait_for_work("orchestrator", 5)
    assert 0.2 <= time.monotonic() - started < 0.3 + WAKE_BOUND
    assert len(await pg_provider.fetch_orchestration_items(1, LEASE)) == 1


async def test_a_worker_abandon_delay_wakes_a_local_waiter_when_it_ends(
    pg_provider: PostgresProvider,
) -> None:
    # An activity no runtime here knows is put back with a delay; whichever runtime sharing this
    # provider has it must be woken when the delay ends, not at its next poll.
    await pg_provider.enqueue_orchestrator_messages([start("a")])
    [item] = await pg_provider.fetch_orchestration_items(1, LEASE)
    assert await pg_provider.ack_orchestration_items([first_ack(item, activities=1)]) == [None]
    [lease] = await pg_provider.fetch_work_items(1, LEASE)
    await pg_provider.wait_for_work("worker", 0)
    await pg_provider.abandon_work_item(lease.lock_token, delay=0.3)
    started = time.monotonic()
    await pg_provider.wait_for_work("worker", 5)
    assert 0.2 <= time.monotonic() - started < 0.3 + WAKE_BOUND
    assert len(await pg_provider.fetch_work_items(1, LEASE)) == 1


async def test_listener_reconnects_after_its_backend_is_terminated(
    make_provider: Any, admin: psycopg.Connection[Any]
) -> None:
    producer = await make_provider()
    consumer = await make_provider()
    listener = consumer.listener
    assert listener is not None and listener.connected and listener.connects == 1
    old_pid = listener.backend_pid
    admin.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    await eventually(lambda: listener.connects >= 2 and listener.connected, timeout=10)
    assert listener.backend_pid != old_pid
    waiter = await timed_wait(consumer, "orchestrator")
    sent = time.monotonic()
    await producer.enqueue_orchestrator_messages([start("after-reconnect")])
    assert await asyncio.wait_for(waiter, 5) - sent < WAKE_BOUND


async def test_waiters_wake_when_the_listener_comes_back(
    make_provider: Any, admin: psycopg.Connection[Any]
) -> None:
    """Notifications sent while the listener was down are lost, so a reconnect wakes everyone."""
    consumer = await make_provider()
    listener = consumer.listener
    assert listener is not None
    waiter = await timed_wait(consumer, "worker", timeout=30)
    admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
    await asyncio.wait_for(waiter, 10)
    assert listener.connects >= 2


async def test_dead_listener_only_delays_work(make_provider: Any, admin: psycopg.Connection[Any]) -> None:
    producer = await make_provider()
    consumer = await make_provider()
    listener = consumer.listener
    assert listener is not None
    await listener.stop()  # as if it could not reconnect
    await producer.enqueue_orchestrator_messages([start("a")])
    started = time.monotonic()
    await consumer.wait_for_work("orchestrator", 0.3)  # the runtime's fallback poll interval
    assert time.monotonic() - started >= 0.25
    assert len(await consumer.fetch_orchestration_items(1, LEASE)) == 1


@pytest.mark.parametrize("same_provider", [True, False], ids=["same-provider", "other-provider"])
async def test_messages_that_arrived_during_a_lock_wake_waiters_when_the_ack_releases_it(
    make_provider: Any, same_provider: bool
) -> None:
    """A fetcher told of a message for a locked instance finds nothing and waits again; the ack that
    releases the instance must wake it, or the message waits for the next poll."""
    runtime = await make_provider()
    fetcher = runtime if same_provider else await make_provider()
    await runtime.enqueue_orchestrator_messages([start("a")])
    [item] = await runtime.fetch_orchestration_items(1, LEASE)
    assert await runtime.ack_orchestration_items([first_ack(item)]) == [None]
    await runtime.enqueue_orchestrator_messages([event("a", data="1")])
    [item] = await runtime.fetch_orchestration_items(1, LEASE)
    await fetcher.enqueue_orchestrator_messages([event("a", data="2")])  # arrives during the lock
    await fetcher.wait_for_work("orchestrator", 5)
    assert await fetcher.fetch_orchestration_items(1, LEASE) == []  # locked: back to waiting
    waiter = await timed_wait(fetcher, "orchestrator")
    sent = time.monotonic()
    assert await runtime.ack_orchestration_items([empty_ack(item)]) == [None]
    assert await asyncio.wait_for(waiter, 5) - sent < WAKE_BOUND
    [left] = await fetcher.fetch_orchestration_items(1, LEASE)
    assert [m.data for m in left.messages] == ["2"]  # type: ignore[attr-defined]


async def test_an_ack_leaving_nothing_behind_wakes_no_fetcher(make_provider: Any) -> None:
    runtime = await make_provider()
    await runtime.enqueue_orchestrator_messages([start("a")])
    [item] = await runtime.fetch_orchestration_items(1, LEASE)
    waiter = await timed_wait(runtime, "orchestrator", timeout=0.3)
    assert await runtime.ack_orchestration_items([first_ack(item)]) == [None]
    started = time.monotonic()
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started > 0.2


async def test_instance_change_wakes_a_client_in_another_provider(make_provider: Any) -> None:
    runtime = await make_provider()
    client = await make_provider()
    await runtime.enqueue_orchestrator_messages([start("a")])
    [item] = await runtime.fetch_orchestration_items(1, LEASE)
    assert await runtime.ack_orchestration_items([first_ack(item)]) == [None]
    # The first wait subscribes to the instance channel (and returns after a short poll).
    await client.wait_for_instance_change("a", 0.5)
    listener = client.listener
    assert listener is not None
    await eventually(lambda: listener.listening_to(channel_names(client.schema)[1]))
    await client.enqueue_orchestrator_messages([start("a")])
    [item] = await runtime.fetch_orchestration_items(1, LEASE)

    async def waiter() -> float:
        await client.wait_for_instance_change("a", 10)
        return time.monotonic()

    task = asyncio.ensure_future(waiter())
    await asyncio.sleep(0.05)
    assert not task.done()
    sent = time.monotonic()
    ack = first_ack(item, custom_status_changed=True, custom_status='"half"')
    ack.history = []
    assert await runtime.ack_orchestration_items([ack]) == [None]
    assert await asyncio.wait_for(task, 5) - sent < WAKE_BOUND


async def test_no_listen_mode_has_no_cross_process_wakeups(make_provider: Any) -> None:
    producer = await make_provider()
    consumer = await make_provider(listen=False)
    assert consumer.listener is None
    assert consumer.capabilities.wakeups and not consumer.capabilities.cross_process
    waiter = await timed_wait(consumer, "orchestrator", timeout=0.4)
    await producer.enqueue_orchestrator_messages([start("a")])
    started = time.monotonic()
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started > 0.2
    # Its own commits still wake its own waiters at once.
    waiter = await timed_wait(consumer, "orchestrator", timeout=10)
    await consumer.enqueue_orchestrator_messages([start("b")])
    await asyncio.wait_for(waiter, WAKE_BOUND)


async def test_notify_off_sends_nothing(make_provider: Any) -> None:
    producer = await make_provider(notify=False)
    consumer = await make_provider()
    waiter = await timed_wait(consumer, "orchestrator", timeout=0.4)
    await producer.enqueue_orchestrator_messages([start("a")])
    started = time.monotonic()
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started > 0.2


# -- the in-process hub ---------------------------------------------------------------------------


async def test_work_signalled_before_a_wait_returns_at_once() -> None:
    hub = WakeHub()
    hub.work("worker")
    started = time.monotonic()
    await hub.wait_for_work("worker", 5)
    assert time.monotonic() - started < 0.05
    # ... once: the next wait blocks.
    started = time.monotonic()
    await hub.wait_for_work("worker", 0.1)
    assert time.monotonic() - started >= 0.09


async def test_every_waiter_wakes_on_one_signal() -> None:
    hub = WakeHub()
    waiters = [asyncio.ensure_future(hub.wait_for_work("orchestrator", 5)) for _ in range(3)]
    await asyncio.sleep(0.02)
    hub.work("orchestrator")
    await asyncio.wait_for(asyncio.gather(*waiters), 1)


async def test_signals_are_per_queue() -> None:
    hub = WakeHub()
    waiter = asyncio.ensure_future(hub.wait_for_work("worker", 0.2))
    await asyncio.sleep(0.02)
    hub.work("orchestrator")
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await waiter


async def test_an_earlier_timer_shortens_a_wait_without_ending_it() -> None:
    hub = WakeHub()
    hub.timer(now_ms() + 5_000)
    started = time.monotonic()
    waiter = asyncio.ensure_future(hub.wait_for_work("orchestrator", 10))
    await asyncio.sleep(0.02)
    hub.timer(now_ms() + 150)
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await asyncio.wait_for(waiter, 1)
    assert 0.12 <= time.monotonic() - started < 0.4


async def test_every_waiter_wakes_when_a_timer_comes_due() -> None:
    # The first waiter to see the deadline must not swallow it: every runtime sharing this
    # provider object fetches, not only the one whose sleep ended first.
    hub = WakeHub()
    hub.timer(now_ms() + 150)
    started = time.monotonic()
    waiters = [asyncio.ensure_future(hub.wait_for_work("orchestrator", 10)) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert time.monotonic() - started < 1


async def test_due_times_are_per_queue() -> None:
    hub = WakeHub()
    hub.timer(now_ms() + 100, "worker")
    orchestrator = asyncio.ensure_future(hub.wait_for_work("orchestrator", 0.6))
    await asyncio.wait_for(hub.wait_for_work("worker", 5), 1)
    assert not orchestrator.done()
    await orchestrator


async def test_past_timer_counts_as_work_now() -> None:
    hub = WakeHub()
    hub.timer(now_ms() - 10)
    await asyncio.wait_for(hub.wait_for_work("orchestrator", 5), 0.1)


async def test_instance_waits_are_forgotten_after_they_end() -> None:
    hub = WakeHub()
    await hub.wait_for_instance("x", 0.01)
    assert hub._instances == {}
    waiter = asyncio.ensure_future(hub.wait_for_instance("y", 5))
    await asyncio.sleep(0.01)
    hub.instance_changed("y")
    await asyncio.wait_for(waiter, 1)
    assert hub._instances == {}


@pytest.mark.parametrize(
    ("payload", "worker", "orchestrator", "timer"),
    [("w", True, False, False), ("o", False, True, False), ("o@9999999999999", False, True, True),
     ("@9999999999999", False, False, True), ("@garbage", False, False, False), ("", False, False, False)],
)  # fmt: skip
async def test_payloads(payload: str, worker: bool, orchestrator: bool, timer: bool) -> None:
    hub = WakeHub()
    hub.handle_payload(payload)
    assert (hub._queues["worker"].gen == 1) is worker
    assert (hub._queues["orchestrator"].gen == 1) is orchestrator
    assert bool(hub._timers["orchestrator"]) is timer
    assert hub._timers["worker"] == []


def test_payloads_are_coalesced_per_queue() -> None:
    assert make_payloads(worker=True, orchestrator_now=True, earliest_timer_ms=5) == ["w", "o@5"]
    assert make_payloads(worker=False, orchestrator_now=False, earliest_timer_ms=5) == ["@5"]
    assert make_payloads(worker=False, orchestrator_now=True, earliest_timer_ms=None) == ["o"]
    assert make_payloads(worker=False, orchestrator_now=False, earliest_timer_ms=None) == []


@pytest.mark.parametrize("schema", ["a", "x" * 63, "Mixed_Case"])
def test_channel_names_fit_postgres_identifiers(schema: str) -> None:
    work, instance = channel_names(schema)
    assert work != instance
    assert len(work.encode()) <= 63 and len(instance.encode()) <= 63
    assert channel_names("x" * 62 + "y") != channel_names("x" * 63)
