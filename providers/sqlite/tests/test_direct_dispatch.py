"""Direct dispatch: acks that lease the activities they schedule or lock the instance a result wakes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlite_support import (
    LOCK,
    ack_for,
    activity,
    completed,
    create_instance,
    fetch_one,
    now_ms,
    raise_event,
    result,
    scheduled,
    start,
    started,
    timer,
)

from perdure.history import ActivityExecute, ActivityRef
from perdure.provider import (
    OrchestrationAck,
    OrchestrationItem,
    ProviderError,
    Queue,
    WorkItemAck,
    WorkItemLease,
)
from perdure_sqlite import SqliteProvider
from perdure_sqlite._store import instance_of_token, row_of_token
from perdure_sqlite._thread import DURABLE

FAST = 0.25  # a wake-up must arrive well within this


async def _schedule(
    db: SqliteProvider, instance_id: str, activities: list[ActivityExecute], lease: int, timeout: float = LOCK
) -> list[WorkItemLease]:
    """Start ``instance_id`` with a first turn that schedules ``activities``, leasing the first ``lease``."""
    await db.enqueue_orchestrator_messages([start(instance_id)])
    item = await fetch_one(db)
    history = [started()] + [scheduled(a.activity_id) for a in activities]
    ack = ack_for(
        item, history=history, worker_items=activities, lease_worker_items=lease, worker_lease_timeout=timeout
    )
    [leases] = await db.ack_orchestration_items([ack])
    assert isinstance(leases, list), leases
    return leases


async def _worker_rows(db: SqliteProvider) -> list[tuple[object, ...]]:
    return await db._execute(
        "SELECT activity_id, lock_token IS NOT NULL, attempt_count FROM worker_queue ORDER BY id"
    )


async def _drain(db: SqliteProvider) -> None:
    """Consume any sticky wake-up left by earlier setup."""
    await db.wait_for_work("orchestrator", 0)
    await db.wait_for_work("worker", 0)


async def _woken(db: SqliteProvider, queue: Queue, within: float = 0.15) -> bool:
    """Whether a wait on ``queue`` returns well before ``within`` (a sticky or a live wake-up)."""
    began = time.perf_counter()
    await db.wait_for_work(queue, within)
    return time.perf_counter() - began < within * 0.7


# -- leases taken by an orchestration ack ---------------------------------------------------------


def test_capability_is_declared() -> None:
    assert SqliteProvider(":memory:").capabilities.direct_dispatch


async def test_leased_items_are_returned_in_order_and_hidden_from_fetches(db: SqliteProvider) -> None:
    items = [activity("a", 2), activity("a", 3), activity("a", 4)]
    leases = await _schedule(db, "a", items, lease=2)
    assert [lease.item for lease in leases] == items[:2]
    assert all(lease.item is item for lease, item in zip(leases, items, strict=False))  # the very object
    assert [lease.ref for lease in leases] == [ActivityRef("a", 1, 2), ActivityRef("a", 1, 3)]
    assert [lease.attempt_count for lease in leases] == [1, 1]
    assert all(lease.decode_error is None for lease in leases)
    assert await _worker_rows(db) == [(2, 1, 1), (3, 1, 1), (4, 0, 0)]
    # The token names the row, as a fetched one does.
    [(first_id,)] = await db._execute("SELECT min(id) FROM worker_queue")
    assert [row_of_token("test", lease.lock_token) for lease in leases] == [first_id, first_id + 1]
    [fetched] = await db.fetch_work_items(5, LOCK)
    assert fetched.ref.activity_id == 4
    assert len({fetched.lock_token, *(lease.lock_token for lease in leases)}) == 3


async def test_a_leased_token_acks_renews_and_abandons_like_a_fetched_one(db: SqliteProvider) -> None:
    one, two = await _schedule(db, "a", [activity("a", 2), activity("a", 3)], lease=2)
    assert await db.renew_work_item_locks([one.lock_token, two.lock_token], LOCK) == [True, True]
    assert await db.ack_work_items([WorkItemAck(one.lock_token, result("a", 2))]) == [None]
    [again_acked] = await db.ack_work_items([WorkItemAck(one.lock_token, None)])
    assert isinstance(again_acked, ProviderError)
    assert not again_acked.retryable
    await db.abandon_work_item(two.lock_token)
    [again] = await db.fetch_work_items(5, LOCK)
    assert (again.ref.activity_id, again.attempt_count) == (3, 2)
    assert await db.renew_work_item_locks([two.lock_token], LOCK) == [False]
    assert (await fetch_one(db)).messages == [result("a", 2)]


async def test_a_leased_token_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "perdure.db"
    async with SqliteProvider(path) as db:
        [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    async with SqliteProvider(path) as db:
        assert await db.fetch_work_items(5, LOCK) == []
        assert await db.renew_work_item_locks([lease.lock_token], LOCK) == [True]
        assert await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2))]) == [None]
        assert (await fetch_one(db)).messages == [result("a", 2)]


async def test_a_lapsed_lease_is_fetched_again_as_a_second_attempt(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1, timeout=0.2)
    assert await db.fetch_work_items(5, LOCK) == []
    await asyncio.sleep(0.3)
    [again] = await db.fetch_work_items(5, LOCK)
    assert (again.ref.activity_id, again.attempt_count) == (2, 2)
    assert again.lock_token != lease.lock_token
    [error] = await db.ack_work_items([WorkItemAck(lease.lock_token, None)])
    assert isinstance(error, ProviderError)
    assert not error.retryable


async def test_lease_counts_beyond_the_items_and_acks_without_items(db: SqliteProvider) -> None:
    leases = await _schedule(db, "a", [activity("a", 2)], lease=5)
    assert [lease.ref.activity_id for lease in leases] == [2]
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert await db.ack_orchestration_items([ack_for(item, lease_worker_items=3)]) == [[]]
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert await db.ack_orchestration_items([ack_for(item, worker_items=[activity("a", 3)])]) == [None]


async def test_a_failing_leasing_ack_leaves_nothing_and_spares_the_batch(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a"), start("b")])
    one, two = await db.fetch_orchestration_items(2, LOCK)
    bad = ack_for(one, history=[started()], worker_items=[activity("a", 2)], lease_worker_items=1)
    good = ack_for(
        two, history=[started(), scheduled(2)], worker_items=[activity("b", 2)], lease_worker_items=1
    )
    failed, leases = await db.ack_orchestration_items([bad, good])  # event 1 of "a" exists already
    assert isinstance(failed, ProviderError)
    assert isinstance(leases, list)
    assert [lease.ref for lease in leases] == [ActivityRef("b", 1, 2)]
    assert await db._execute("SELECT instance_id, attempt_count FROM worker_queue") == [("b", 1)]


async def test_an_item_both_leased_and_cancelled_is_rejected(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    ack = ack_for(
        item,
        history=[started()],
        worker_items=[activity("a", 2)],
        cancelled_activities=[ActivityRef("a", 1, 2)],
        lease_worker_items=1,
    )
    [error] = await db.ack_orchestration_items([ack])
    assert isinstance(error, ProviderError)
    assert not error.retryable
    assert await db.get_instance("a") is None


async def test_only_unleased_items_wake_the_worker_dispatcher(db: SqliteProvider) -> None:
    await _schedule(db, "a", [activity("a", 2)], lease=1)
    assert not await _woken(db, "worker")
    await _schedule(db, "b", [activity("b", 2), activity("b", 3)], lease=1)
    assert await _woken(db, "worker")


# -- instance locks taken by a work-item ack ------------------------------------------------------


async def test_a_work_ack_locks_the_instance_as_a_fetch_would(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    await db.enqueue_orchestrator_messages([raise_event("a"), timer("a", now_ms() + 60_000)])
    [locked] = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)])
    assert isinstance(locked, OrchestrationItem)
    assert locked.instance_id == "a"
    assert instance_of_token("test", locked.lock_token) == "a"
    assert locked.lock_token.startswith("o")
    assert locked.messages == [raise_event("a"), result("a", 2)]  # the future timer is not tagged
    assert locked.attempt_count == 1
    assert locked.bad_messages == []
    assert locked.instance is not None
    assert (locked.instance.status, locked.instance.last_event_id) == ("running", 2)
    # Held: no fetch gets it, renew works, and the ack consumes exactly the tagged messages.
    assert await db.fetch_orchestration_items(5, LOCK) == []
    await db.renew_orchestration_lock(locked.lock_token, LOCK)
    final = ack_for(locked, history=[completed(3)], status="completed", output='"r"')
    assert await db.ack_orchestration_items([final]) == [None]
    assert await db._execute("SELECT count(*) FROM orchestrator_queue") == [(1,)]  # the timer
    assert await db._execute("SELECT count(*) FROM instance_locks") == [(0,)]


async def test_a_direct_lock_counts_attempts_and_decodes_like_a_fetch(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    abandoned = await fetch_one(db)
    await db.abandon_orchestration_item(abandoned.lock_token)
    await db._execute("UPDATE orchestrator_queue SET payload = '{corrupt' WHERE instance_id = 'a'")
    [locked] = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)])
    assert isinstance(locked, OrchestrationItem)
    assert locked.attempt_count == 2  # the abandoned event was fetched once before
    assert locked.messages == [result("a", 2)]
    assert len(locked.bad_messages) == 1
    assert locked.bad_messages[0].startswith("message ")


async def test_an_instance_held_elsewhere_is_left_to_a_fetch(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    held = await fetch_one(db)
    await _drain(db)
    acked = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)])
    assert acked == [None]
    assert await _woken(db, "orchestrator")  # its wake-up still fires
    assert await db.ack_orchestration_items([ack_for(held)]) == [None]  # the holder's lock is intact
    assert (await fetch_one(db)).messages == [result("a", 2)]


async def test_a_lapsed_lock_elsewhere_is_taken_over(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    lapsed = await fetch_one(db, lock_timeout=0.05)
    await asyncio.sleep(0.1)
    [locked] = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)])
    assert isinstance(locked, OrchestrationItem)
    assert locked.messages == [raise_event("a"), result("a", 2)]
    assert locked.attempt_count == 2
    [error] = await db.ack_orchestration_items([ack_for(lapsed)])
    assert isinstance(error, ProviderError)
    assert await db.ack_orchestration_items([ack_for(locked)]) == [None]


async def test_only_completions_not_locked_directly_wake_the_dispatcher(db: SqliteProvider) -> None:
    [one] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    [two] = await _schedule(db, "b", [activity("b", 2)], lease=1)
    await _drain(db)
    [locked] = await db.ack_work_items([WorkItemAck(one.lock_token, result("a", 2), lock_instance=LOCK)])
    assert isinstance(locked, OrchestrationItem)
    assert not await _woken(db, "orchestrator")
    await db.enqueue_orchestrator_messages([raise_event("b")])
    held = await fetch_one(db)
    await _drain(db)
    assert await db.ack_work_items([WorkItemAck(two.lock_token, result("b", 2), lock_instance=LOCK)]) == [
        None
    ]
    assert await _woken(db, "orchestrator")
    await db.ack_orchestration_items([ack_for(held)])


async def test_each_ack_of_a_batch_locks_or_fails_on_its_own(db: SqliteProvider) -> None:
    a = await _schedule(db, "a", [activity("a", 2), activity("a", 3)], lease=2)
    [b] = await _schedule(db, "b", [activity("b", 2)], lease=1)
    results = await db.ack_work_items(
        [
            WorkItemAck(a[0].lock_token, result("a", 2), lock_instance=LOCK),
            WorkItemAck("garbage", result("a", 3), lock_instance=LOCK),
            WorkItemAck(a[1].lock_token, result("a", 3), lock_instance=LOCK),  # "a" is locked by now
            WorkItemAck(b.lock_token, result("b", 2), lock_instance=LOCK),
            WorkItemAck(b.lock_token, None, lock_instance=LOCK),  # already acked
        ]
    )
    first, bad, second, other, gone = results
    assert isinstance(first, OrchestrationItem)
    assert first.messages == [result("a", 2)]
    assert isinstance(bad, ProviderError)
    assert second is None
    assert isinstance(other, OrchestrationItem)
    assert other.instance_id == "b"
    assert first.lock_token != other.lock_token
    assert isinstance(gone, ProviderError)
    assert await db.ack_orchestration_items([ack_for(first), ack_for(other)]) == [None, None]
    assert (await fetch_one(db)).messages == [result("a", 3)]


async def test_an_ack_without_completion_locks_nothing(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    assert await db.ack_work_items([WorkItemAck(lease.lock_token, None, lock_instance=LOCK)]) == [None]
    assert await db._execute("SELECT count(*) FROM instance_locks") == [(0,)]


async def test_a_work_ack_that_locks_an_instance_commits_without_an_fsync(file_db: SqliteProvider) -> None:
    [lease] = await _schedule(file_db, "a", [activity("a", 2)], lease=1)
    assert file_db._db is not None
    assert file_db._db._synchronous_full  # the turn's ack was durable
    [locked] = await file_db.ack_work_items(
        [WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)]
    )
    assert isinstance(locked, OrchestrationItem)
    assert not file_db._db._synchronous_full


# -- instance-change waits ------------------------------------------------------------------------


async def test_a_history_only_ack_does_not_wake_a_waiting_client(db: SqliteProvider) -> None:
    [lease] = await _schedule(db, "a", [activity("a", 2)], lease=1)
    assert await db.get_instance("a") is not None
    waiter = asyncio.ensure_future(db.wait_for_instance_change("a", 10))
    [locked] = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2), lock_instance=LOCK)])
    assert isinstance(locked, OrchestrationItem)
    step = ack_for(locked, history=[scheduled(3)], worker_items=[activity("a", 3)], lease_worker_items=1)
    [leases] = await db.ack_orchestration_items([step])
    await asyncio.sleep(0.15)
    assert not waiter.done()  # a step of the chain is invisible to the client
    assert isinstance(leases, list)
    [locked] = await db.ack_work_items(
        [WorkItemAck(leases[0].lock_token, result("a", 3), lock_instance=LOCK)]
    )
    assert isinstance(locked, OrchestrationItem)
    began = time.perf_counter()
    await db.ack_orchestration_items(
        [ack_for(locked, history=[completed(4)], status="completed", output='"r"')]
    )
    await asyncio.wait_for(waiter, FAST)
    assert time.perf_counter() - began < FAST


async def test_a_change_between_read_and_wait_survives_history_only_acks(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert await db.get_instance("a") is not None
    await db.ack_orchestration_items([ack_for(item, custom_status='"half"', custom_status_changed=True)])
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    await db.ack_orchestration_items([ack_for(item, history=[scheduled(2)])])
    began = time.perf_counter()
    await db.wait_for_instance_change("a", 10)
    assert time.perf_counter() - began < FAST


async def test_creating_the_instance_wakes_a_client_waiting_for_it(db: SqliteProvider) -> None:
    assert await db.get_instance("a") is None
    waiter = asyncio.ensure_future(db.wait_for_instance_change("a", 10))
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    await db.ack_orchestration_items([ack_for(item, history=[started()])])
    await asyncio.wait_for(waiter, FAST)


@pytest.mark.parametrize("execution_id", [1, 2])
async def test_status_changes_wake_a_waiting_client(db: SqliteProvider, execution_id: int) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    await db.get_instance("a")
    waiter = asyncio.ensure_future(db.wait_for_instance_change("a", 10))
    await asyncio.sleep(0.05)
    if execution_id == 1:
        ack = ack_for(item, history=[completed(2)], status="failed", output='{"kind":"application"}')
    else:  # the first ack of a continued execution
        ack = ack_for(item, execution_id=2, history=[started()], status="running", output='"next"')
    assert await db.ack_orchestration_items([ack]) == [None]
    await asyncio.wait_for(waiter, FAST)


# -- instance locks kept by an orchestration ack, and work items consumed by the next one --------


async def _hold(db: SqliteProvider, instance_id: str, keep: float = LOCK) -> tuple[OrchestrationItem, str]:
    """Start ``instance_id`` with a turn that leases activity 2 and keeps the lock; (item, lease)."""
    await db.enqueue_orchestrator_messages([start(instance_id)])
    item = await fetch_one(db)
    ack = ack_for(
        item,
        history=[started(), scheduled(2)],
        worker_items=[activity(instance_id, 2)],
        lease_worker_items=1,
        keep_lock=keep,
    )
    [leases] = await db.ack_orchestration_items([ack])
    assert isinstance(leases, list), leases
    return item, leases[0].lock_token


async def _locks(db: SqliteProvider) -> list[tuple[object, ...]]:
    return await db._execute("SELECT instance_id, lock_token FROM instance_locks ORDER BY instance_id")


async def test_a_kept_lock_holds_the_instance_and_the_next_ack_consumes_the_lease(db: SqliteProvider) -> None:
    item, lease = await _hold(db, "a")
    assert await _locks(db) == [("a", item.lock_token)]
    assert await db._execute("SELECT count(*) FROM orchestrator_queue") == [(0,)]  # tagged ones gone
    assert await db.fetch_orchestration_items(5, LOCK) == []
    await db.renew_orchestration_lock(item.lock_token, LOCK)
    final = ack_for(
        item, history=[completed(3)], status="completed", output='"r"', completed_work_items=[lease]
    )
    assert await db.ack_orchestration_items([final]) == [None]
    assert await _locks(db) == []
    assert await db._execute("SELECT count(*) FROM worker_queue") == [(0,)]
    info = await db.get_instance("a")
    assert info is not None
    assert (info.status, info.last_event_id) == ("completed", 3)
    # The lock is gone, and so is the lease: the same ack again fails.
    [again] = await db.ack_orchestration_items([final])
    assert isinstance(again, ProviderError)
    assert not again.retryable


async def test_a_kept_lock_survives_reopening_the_file_until_it_lapses(tmp_path: Path) -> None:
    path = tmp_path / "perdure.db"
    async with SqliteProvider(path) as db:
        item, lease = await _hold(db, "a", keep=0.4)
        await db.enqueue_orchestrator_messages([raise_event("a")])  # arrives during the kept lock
    async with SqliteProvider(path) as db:
        assert await db.fetch_orchestration_items(5, LOCK) == []
        await asyncio.sleep(0.5)
        # Lapsed: a fetch takes the instance over (the untagged event, the start long deleted)...
        taken = await fetch_one(db)
        assert taken.messages == [raise_event("a")]
        assert taken.lock_token != item.lock_token
        # ... and the old holder's ack, lease and all, fails without consuming the lease.
        [error] = await db.ack_orchestration_items([ack_for(item, completed_work_items=[lease])])
        assert isinstance(error, ProviderError)
        assert not error.retryable
        assert await _worker_rows(db) == [(2, 1, 1)]


async def test_a_kept_lock_is_usable_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "perdure.db"
    async with SqliteProvider(path) as db:
        item, lease = await _hold(db, "a")
    async with SqliteProvider(path) as db:
        ack = ack_for(item, history=[completed(3)], status="completed", completed_work_items=[lease])
        assert await db.ack_orchestration_items([ack]) == [None]
        assert await _locks(db) == []


async def test_a_message_that_arrived_during_the_lock_releases_it(db: SqliteProvider) -> None:
    item, lease = await _hold(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    assert await db.fetch_orchestration_items(5, LOCK) == []  # the dispatcher finds it locked
    await _drain(db)
    ack = ack_for(
        item,
        history=[scheduled(3)],
        worker_items=[activity("a", 3)],
        lease_worker_items=1,
        keep_lock=LOCK,
        completed_work_items=[lease],
    )
    [leases] = await db.ack_orchestration_items([ack])
    assert isinstance(leases, list)
    assert len(leases) == 1  # the rest of the ack is applied as usual
    assert await _locks(db) == []
    assert await _woken(db, "orchestrator")
    assert (await fetch_one(db)).messages == [raise_event("a")]
    [error] = await db.ack_orchestration_items([ack_for(item)])  # the caller's token is void
    assert isinstance(error, ProviderError)


async def test_an_ack_messaging_its_own_instance_does_not_keep_the_lock(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    ack = ack_for(item, history=[started()], orchestrator_items=[raise_event("a")], keep_lock=LOCK)
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await _locks(db) == []
    assert (await fetch_one(db)).messages == [raise_event("a")]


async def test_future_and_other_instances_messages_do_not_release_a_kept_lock(db: SqliteProvider) -> None:
    await create_instance(db, "b")
    await db.enqueue_orchestrator_messages([start("a"), timer("a", now_ms() + 60_000)])
    item = await fetch_one(db)
    ack = ack_for(
        item,
        history=[started()],
        orchestrator_items=[raise_event("b"), timer("a", now_ms() + 60_000, source_id=3)],
        keep_lock=LOCK,
    )
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await _locks(db) == [("a", item.lock_token)]
    assert (await fetch_one(db)).instance_id == "b"


async def test_a_released_lock_wakes_a_waiting_dispatcher_promptly(db: SqliteProvider) -> None:
    item, lease = await _hold(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    assert await db.fetch_orchestration_items(5, LOCK) == []
    await _drain(db)
    waiter = asyncio.ensure_future(db.wait_for_work("orchestrator", 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    began = time.perf_counter()
    ack = ack_for(item, history=[scheduled(3)], keep_lock=LOCK, completed_work_items=[lease])
    assert await db.ack_orchestration_items([ack]) == [None]
    await asyncio.wait_for(waiter, FAST)
    assert time.perf_counter() - began < FAST


async def test_a_plain_release_wakes_for_messages_that_arrived_during_the_lock(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    await db.enqueue_orchestrator_messages([raise_event("a", name="late")])
    assert await db.fetch_orchestration_items(5, LOCK) == []
    await _drain(db)
    waiter = asyncio.ensure_future(db.wait_for_work("orchestrator", 10))
    await asyncio.sleep(0.05)
    assert await db.ack_orchestration_items([ack_for(item)]) == [None]
    await asyncio.wait_for(waiter, FAST)
    assert (await fetch_one(db)).messages == [raise_event("a", name="late")]


async def test_releases_and_kept_locks_with_nothing_waiting_wake_no_one(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a"), timer("a", now_ms() + 60_000)])
    item = await fetch_one(db)
    await _drain(db)
    assert await db.ack_orchestration_items([ack_for(item, keep_lock=LOCK)]) == [None]
    assert not await _woken(db, "orchestrator")
    assert await db.ack_orchestration_items([ack_for(item)]) == [None]
    assert not await _woken(db, "orchestrator")


async def test_completed_work_items_must_all_be_held(db: SqliteProvider) -> None:
    item, lease = await _hold(db, "a")
    [other] = await _schedule(db, "b", [activity("b", 2)], lease=1, timeout=0.05)
    await asyncio.sleep(0.1)  # "b"'s lease lapses
    cases: list[list[str]] = [
        [lease, other.lock_token],  # lapsed
        [lease, "garbage"],  # not a lease token
        [lease, f"{lease}0"],  # a row that does not exist
        [lease.replace(".", "x", 1)],  # the right row, another token
    ]
    for tokens in cases:
        ack = ack_for(
            item,
            history=[scheduled(3)],
            worker_items=[activity("a", 3)],
            lease_worker_items=1,
            completed_work_items=tokens,
        )
        [error] = await db.ack_orchestration_items([ack])
        assert isinstance(error, ProviderError), tokens
        assert not error.retryable
        assert "is not held" in error.message
    # Nothing of those acks was applied: the lock is still kept, the lease still held.
    assert await _locks(db) == [("a", item.lock_token)]
    assert await _worker_rows(db) == [(2, 1, 1), (2, 1, 1)]
    assert [event.event_id for event in await db.read_history("a")] == [1, 2]
    ack = ack_for(item, history=[completed(3)], status="completed", completed_work_items=[lease, lease])
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await _worker_rows(db) == [(2, 1, 1)]  # "b"'s lapsed item is left alone


async def test_a_work_item_acked_by_its_worker_cannot_be_consumed_by_a_turn(db: SqliteProvider) -> None:
    item, lease = await _hold(db, "a")
    assert await db.ack_work_items([WorkItemAck(lease, result("a", 2))]) == [None]
    [error] = await db.ack_orchestration_items([ack_for(item, completed_work_items=[lease])])
    assert isinstance(error, ProviderError)
    assert await _locks(db) == [("a", item.lock_token)]


async def _statements(db: SqliteProvider, ack: OrchestrationAck) -> int:
    """How many SQL statements the ack ran (transaction control and savepoints included)."""
    traced: list[str] = []

    def trace(connection: sqlite3.Connection, effects: object, on: bool) -> None:
        connection.set_trace_callback(traced.append if on else None)

    await db._call("trace", DURABLE, trace, True)
    traced.clear()
    try:
        [outcome] = await db.ack_orchestration_items([ack])
    finally:
        await db._call("trace", DURABLE, trace, False)
    assert not isinstance(outcome, ProviderError), outcome
    return len(traced)


async def test_keeping_and_consuming_cost_no_extra_statement(db: SqliteProvider) -> None:
    """A chain step that keeps the lock and consumes a lease runs the statements of a plain step
    plus one (the lease's delete); the plain step pays nothing for the new fields."""
    held, lease = await _hold(db, "a")
    await _schedule(db, "b", [activity("b", 2)], lease=1)
    await db.enqueue_orchestrator_messages([raise_event("b")])
    fetched = await fetch_one(db)

    def step(item: OrchestrationItem, **fields: object) -> OrchestrationAck:
        instance_id = item.instance_id
        return ack_for(
            item,
            history=[scheduled(3)],
            worker_items=[activity(instance_id, 3)],
            lease_worker_items=1,
            **fields,
        )

    plain = await _statements(db, step(fetched))
    kept = await _statements(db, step(held, keep_lock=LOCK, completed_work_items=[lease]))
    assert kept == plain + 1
