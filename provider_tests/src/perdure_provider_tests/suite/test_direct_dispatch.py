"""Direct dispatch: acks that hand the work they create straight to their caller.

An orchestration ack with ``lease_worker_items`` leases the activities it schedules to its
caller; a work-item ack with ``lock_instance`` locks the instance its completion is for. Each
hand-over must be indistinguishable from the fetch it replaces, and must never take work that
someone else holds. An orchestration ack with ``keep_lock`` keeps its instance locked for the
caller's next turn unless a message of the instance already waits, and one with
``completed_work_items`` deletes the work items whose results the turn applied, all or nothing.
Every test here needs the ``direct_dispatch`` capability.
"""

from __future__ import annotations

import asyncio

import pytest

from perdure.history import ActivityExecute, Message
from perdure.provider import (
    OrchestrationAck,
    OrchestrationAckResult,
    OrchestrationItem,
    Provider,
    WorkItemAck,
    WorkItemLease,
)
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    LEASE,
    ack_fails,
    ack_for,
    ack_ok,
    ack_work_fails,
    ack_work_ok,
    activity,
    assert_no_orchestration_work,
    assert_no_work_items,
    assert_permanent,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_one_work,
    fetch_work,
    now_ms,
    raised,
    raises_permanent,
    ref,
    requires_capability,
    result_message,
    schedule_activities,
    scheduled,
    start_instance,
    take_turn,
    timer_message,
)

direct_dispatch = requires_capability("direct_dispatch")


async def _schedule_turn(
    provider: Provider, instance_id: str, count: int, *, lease: int, timeout: float = LEASE
) -> tuple[list[ActivityExecute], OrchestrationAckResult]:
    """Run a turn of ``instance_id`` scheduling ``count`` activities and leasing the first ``lease``."""
    info = await provider.get_instance(instance_id) or await start_instance(provider, instance_id)
    first = info.last_event_id + 1
    items = [activity(instance_id, first + n, execution_id=info.execution_id) for n in range(count)]
    await enqueue(provider, event_message(instance_id))
    item = await fetch_one(provider, instance_id)
    ack = ack_for(
        item,
        history=[scheduled(work.activity_id) for work in items],
        worker_items=items,
        lease_worker_items=lease,
        worker_lease_timeout=timeout,
    )
    [result] = await provider.ack_orchestration_items([ack])
    return items, result


async def _lease_directly(
    provider: Provider, instance_id: str, count: int, lease: int, timeout: float = LEASE
) -> tuple[list[ActivityExecute], list[WorkItemLease]]:
    """Like :func:`_schedule_turn`, and fail the test unless the ack returned ``lease`` leases."""
    items, result = await _schedule_turn(provider, instance_id, count, lease=lease, timeout=timeout)
    assert isinstance(result, list), f"an ack with lease_worker_items={lease} returned {result!r}"
    assert len(result) == lease, f"lease_worker_items={lease} returned {len(result)} leases"
    return items, result


async def _lock_directly(
    provider: Provider, lease: WorkItemLease, completion: Message, lock: float = LEASE
) -> OrchestrationItem:
    """Ack ``lease`` with ``completion`` and ``lock_instance``; fail unless it locked the instance."""
    [result] = await provider.ack_work_items([WorkItemAck(lease.lock_token, completion, lock_instance=lock)])
    assert isinstance(result, OrchestrationItem), f"a work ack with lock_instance returned {result!r}"
    assert result.instance_id == completion.instance_id
    return result


async def _lapse(factory: ProviderFactory) -> None:
    await asyncio.sleep(factory.lock_timeout + factory.timing_slack)


# -- leases handed over by an orchestration ack ------------------------------------------------


@direct_dispatch
async def test_direct_ack_returns_the_leases_of_its_items(provider: Provider) -> None:
    """An ack with ``lease_worker_items = n`` returns leases of its first n items, in order, at attempt 1."""
    items, leases = await _lease_directly(provider, "i", 3, 3)
    assert [lease.item for lease in leases] == items
    assert [lease.ref for lease in leases] == [ref(work) for work in items]
    assert [lease.attempt_count for lease in leases] == [1, 1, 1]
    assert [lease.decode_error for lease in leases] == [None, None, None]
    assert len({lease.lock_token for lease in leases}) == 3


@direct_dispatch
async def test_only_the_first_n_items_are_leased(provider: Provider) -> None:
    """Only the first ``lease_worker_items`` items are leased; the rest are fetchable at once (attempt 1)."""
    items, leases = await _lease_directly(provider, "i", 4, 2)
    assert [lease.item for lease in leases] == items[:2]
    fetched = await fetch_work(provider)
    assert [lease.item for lease in fetched] == items[2:]
    assert [lease.attempt_count for lease in fetched] == [1, 1]


@direct_dispatch
async def test_no_direct_leases_returns_none(provider: Provider) -> None:
    """An ack with ``lease_worker_items = 0`` returns ``None`` and leaves every worker item fetchable."""
    items, result = await _schedule_turn(provider, "i", 2, lease=0)
    assert result is None, f"an ack without lease_worker_items returned {result!r}"
    assert [lease.item for lease in await fetch_work(provider)] == items


@direct_dispatch
async def test_directly_leased_items_are_not_fetchable(provider: Provider) -> None:
    """Directly leased items are invisible to ``fetch_work_items`` while their lease is held."""
    await _lease_directly(provider, "i", 2, 2)
    await assert_no_work_items(provider)


@direct_dispatch
async def test_lapsed_direct_lease_is_fetched_again(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A direct lease lapses after ``worker_lease_timeout``; the item is then refetched at attempt 2."""
    timeout = provider_factory.lock_timeout
    items, [lease] = await _lease_directly(provider, "i", 1, 1, timeout)
    await asyncio.sleep(timeout / 2)
    await assert_no_work_items(provider)
    await asyncio.sleep(timeout / 2 + provider_factory.timing_slack)
    again = await fetch_one_work(provider)
    assert (again.item, again.attempt_count) == (items[0], 2)
    await ack_work_fails(provider, lease.lock_token)


@direct_dispatch
async def test_direct_lease_acks_renews_and_abandons(provider: Provider) -> None:
    """A direct lease's token acks, renews and abandons exactly as a fetched lease's does."""
    items, leases = await _lease_directly(provider, "i", 3, 3)
    assert await provider.renew_work_item_locks([leases[1].lock_token], LEASE) == [True]
    await provider.abandon_work_item(leases[2].lock_token)
    completion = result_message("i", items[0].activity_id)
    await ack_work_ok(provider, leases[0], completion)
    [again] = await fetch_work(provider)
    assert (again.item, again.attempt_count) == (items[2], 2)
    assert (await fetch_one(provider, "i")).messages == [completion]


@direct_dispatch
async def test_direct_lease_is_cancelled_like_a_fetched_one(provider: Provider) -> None:
    """Cancelling a directly leased activity deletes it: its renewal reports False and its ack fails."""
    items, [lease] = await _lease_directly(provider, "i", 1, 1)
    await take_turn(provider, "i", cancelled_activities=[ref(items[0])])
    assert await provider.renew_work_item_locks([lease.lock_token], LEASE) == [False]
    await ack_work_fails(provider, lease.lock_token, result_message("i", items[0].activity_id))
    await assert_no_orchestration_work(provider)


@direct_dispatch
async def test_failed_direct_ack_leases_nothing(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An ack with ``lease_worker_items`` whose lock is lost returns its error and leases nothing."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await ack_ok(provider, ack_for(item, history=[raised(2)]))  # the token is spent
    spent = ack_for(
        item,
        history=[scheduled(3)],
        worker_items=[activity("i", 3)],
        lease_worker_items=1,
        worker_lease_timeout=provider_factory.lock_timeout,
    )
    await ack_fails(provider, spent)
    await _lapse(provider_factory)  # an item wrongly leased would be fetchable now
    await assert_no_work_items(provider)
    assert [e.event_id for e in await provider.read_history("i")] == [1, 2]


# -- instances locked by a work ack ------------------------------------------------------------


@direct_dispatch
async def test_direct_lock_holds_every_visible_message(provider: Provider) -> None:
    """A work ack's direct lock holds the completion and every other visible message, attempts raised."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    early = event_message("i", '"early"')
    timer = timer_message("i", now_ms() + 60_000)
    await enqueue(provider, early, timer)
    await provider.abandon_orchestration_item((await fetch_one(provider, "i")).lock_token)  # attempt 1
    completion = result_message("i", queued.activity_id)
    item = await _lock_directly(provider, lease, completion)
    assert item.messages == [early, completion]
    assert item.attempt_count == 2
    assert item.bad_messages == []
    assert item.instance == await provider.get_instance("i")


@direct_dispatch
async def test_directly_locked_instance_is_held_until_its_ack(provider: Provider) -> None:
    """A directly locked instance is held until acked with the returned token, sparing later arrivals."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    item = await _lock_directly(provider, lease, result_message("i", queued.activity_id))
    await assert_no_orchestration_work(provider)
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    await assert_no_orchestration_work(provider)
    await ack_ok(provider, ack_for(item, history=[raised(queued.activity_id + 1)]))
    assert [e.event_id for e in await provider.read_history("i")] == [1, 2, 3]
    assert (await fetch_one(provider, "i")).messages == [late]


@direct_dispatch
async def test_direct_lock_renews_and_abandons(provider: Provider) -> None:
    """A direct lock's token renews and abandons like a fetched one's; its messages are then at attempt 2."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    completion = result_message("i", queued.activity_id)
    item = await _lock_directly(provider, lease, completion)
    await provider.renew_orchestration_lock(item.lock_token, LEASE)
    await provider.abandon_orchestration_item(item.lock_token)
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([completion], 2)


@direct_dispatch
async def test_direct_lock_lapses_after_its_timeout(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A direct lock lasts ``lock_instance`` seconds; then a fetcher takes the instance at attempt 2."""
    timeout = provider_factory.lock_timeout
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    completion = result_message("i", queued.activity_id)
    item = await _lock_directly(provider, lease, completion, timeout)
    await asyncio.sleep(timeout / 2)
    await assert_no_orchestration_work(provider)
    await asyncio.sleep(timeout / 2 + provider_factory.timing_slack)
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([completion], 2)
    await ack_fails(provider, ack_for(item))


@direct_dispatch
async def test_second_completion_waits_for_the_direct_lock(provider: Provider) -> None:
    """A second completion with ``lock_instance`` for a locked instance gets ``None`` and is fetched later."""
    queued = await schedule_activities(provider, "i", 2)
    leases = await fetch_work(provider)
    first = result_message("i", queued[0].activity_id, result='"1"')
    second = result_message("i", queued[1].activity_id, result='"2"')
    item = await _lock_directly(provider, leases[0], first)
    [result] = await provider.ack_work_items([WorkItemAck(leases[1].lock_token, second, lock_instance=LEASE)])
    assert result is None, f"a completion for a locked instance returned {result!r}"
    await assert_no_orchestration_work(provider)
    assert item.messages == [first]
    await ack_ok(provider, ack_for(item))
    assert (await fetch_one(provider, "i")).messages == [second]


@direct_dispatch
async def test_instance_held_by_a_fetcher_is_not_locked_directly(provider: Provider) -> None:
    """A direct lock never takes an instance a fetcher holds: the ack returns ``None``, that lock holds."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await enqueue(provider, event_message("i"))
    held = await fetch_one(provider, "i")
    completion = result_message("i", queued.activity_id)
    [result] = await provider.ack_work_items([WorkItemAck(lease.lock_token, completion, lock_instance=LEASE)])
    assert result is None, f"a completion for an instance held by a fetcher returned {result!r}"
    await assert_no_orchestration_work(provider)
    await provider.renew_orchestration_lock(held.lock_token, LEASE)
    await ack_ok(provider, ack_for(held))
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([completion], 1)


@direct_dispatch
async def test_lapsed_lock_does_not_stop_a_direct_lock(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A lapsed instance lock does not stop a direct lock, which takes the instance as a fetch would."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    early = event_message("i", '"early"')
    await enqueue(provider, early)
    stale = await fetch_one(provider, "i", provider_factory.lock_timeout)
    await _lapse(provider_factory)
    completion = result_message("i", queued.activity_id)
    item = await _lock_directly(provider, lease, completion)
    assert (item.messages, item.attempt_count) == ([early, completion], 2)
    await ack_fails(provider, ack_for(stale))
    await ack_ok(provider, ack_for(item))
    await assert_no_orchestration_work(provider)


@direct_dispatch
async def test_lost_lease_with_lock_instance_locks_nothing(provider: Provider) -> None:
    """A work ack with ``lock_instance`` whose lease is lost returns its error and locks nothing."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    await enqueue(provider, event_message("i"))
    completion = result_message("i", queued.activity_id)
    [result] = await provider.ack_work_items([WorkItemAck(lease.lock_token, completion, lock_instance=LEASE)])
    assert_permanent(result)
    assert (await fetch_one(provider, "i")).messages == [event_message("i")]


# -- batches and wake-ups ----------------------------------------------------------------------


@direct_dispatch
async def test_direct_and_plain_orchestration_acks_mix_in_a_batch(provider: Provider) -> None:
    """In one batch, orchestration acks with and without ``lease_worker_items`` each get their own result."""
    for instance_id in ("a", "b", "c"):
        await start_instance(provider, instance_id)
    await enqueue(provider, *(event_message(instance_id) for instance_id in ("a", "b", "c")))
    items = {item.instance_id: item for item in await fetch_items(provider)}
    work = {instance_id: activity(instance_id, 2) for instance_id in ("a", "b", "c")}

    def turn(instance_id: str, **fields: object) -> OrchestrationAck:
        return ack_for(items[instance_id], history=[scheduled(2)], worker_items=[work[instance_id]], **fields)

    acks = [turn("a", lease_worker_items=1), turn("b"), turn("c", lease_worker_items=1, lock_token="bogus")]
    leased, plain, failed = await provider.ack_orchestration_items(acks)
    assert isinstance(leased, list), f"the direct ack returned {leased!r}"
    assert [lease.item for lease in leased] == [work["a"]]
    assert plain is None, f"the plain ack returned {plain!r}"
    assert_permanent(failed)
    assert [lease.item for lease in await fetch_work(provider)] == [work["b"]]


@direct_dispatch
async def test_direct_and_plain_work_acks_mix_in_a_batch(provider: Provider) -> None:
    """In one batch, work acks with and without ``lock_instance`` each get their own result, in order."""
    queued_a = await schedule_activities(provider, "a", 2)
    [queued_b] = await schedule_activities(provider, "b", 1)
    a1, a2, b1 = await fetch_work(provider)
    done_a1, done_a2 = (result_message("a", work.activity_id) for work in queued_a)
    done_b1 = result_message("b", queued_b.activity_id)
    results = await provider.ack_work_items(
        [
            WorkItemAck(a1.lock_token, done_a1, lock_instance=LEASE),
            WorkItemAck(b1.lock_token, done_b1),
            WorkItemAck("bogus", result_message("c", 2), lock_instance=LEASE),
            WorkItemAck(a2.lock_token, done_a2, lock_instance=LEASE),  # "a" is locked by the first
        ]
    )
    assert len(results) == 4, f"4 acks returned {len(results)} results"
    locked, plain, failed, late = results
    assert isinstance(locked, OrchestrationItem), f"the first direct ack returned {locked!r}"
    assert (locked.instance_id, locked.messages) == ("a", [done_a1])
    assert plain is None, f"the plain ack returned {plain!r}"
    assert_permanent(failed)
    assert late is None, f"a completion for an instance the batch locked returned {late!r}"
    [fetched] = await fetch_items(provider)
    assert (fetched.instance_id, fetched.messages) == ("b", [done_b1])
    await ack_ok(provider, ack_for(locked))
    assert (await fetch_one(provider, "a")).messages == [done_a2]


@requires_capability("wakeups")
@direct_dispatch
async def test_status_change_through_a_direct_lock_wakes_waiters(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, a status change committed through a direct lock wakes ``wait_for_instance_change``."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    item = await _lock_directly(provider, lease, result_message("i", queued.activity_id))
    waiter = asyncio.ensure_future(provider.wait_for_instance_change("i", 30.0))
    await asyncio.sleep(0)  # let the waiter start; it may only return early, never miss the ack below
    await ack_ok(provider, ack_for(item, history=[raised(3)], status="completed", output='"done"'))
    try:
        await asyncio.wait_for(waiter, provider_factory.wakeup_latency)
    except TimeoutError:
        pytest.fail(
            f"a status change did not wake wait_for_instance_change in {provider_factory.wakeup_latency}s"
        )


# -- locks kept for the next turn, and work items completed in memory ---------------------------


async def _held_turn(
    provider: Provider, instance_id: str, *, keep: float = LEASE, lease_timeout: float = LEASE
) -> tuple[OrchestrationItem, WorkItemLease]:
    """Run a turn that schedules one activity, leases it directly and keeps the lock: the runtime's hold.

    Fail the test unless the ack returned the one lease; return the fetched item (its token is the
    kept lock's) and that lease.
    """
    info = await provider.get_instance(instance_id) or await start_instance(provider, instance_id)
    work = activity(instance_id, info.last_event_id + 1, execution_id=info.execution_id)
    await enqueue(provider, event_message(instance_id))
    item = await fetch_one(provider, instance_id)
    ack = ack_for(
        item,
        history=[scheduled(work.activity_id)],
        worker_items=[work],
        lease_worker_items=1,
        worker_lease_timeout=lease_timeout,
        keep_lock=keep,
    )
    [result] = await provider.ack_orchestration_items([ack])
    assert isinstance(result, list), f"an ack with keep_lock and lease_worker_items=1 returned {result!r}"
    assert [lease.item for lease in result] == [work]
    return item, result[0]


async def _event_ids(provider: Provider, instance_id: str) -> list[int]:
    return [event.event_id for event in await provider.read_history(instance_id)]


@direct_dispatch
async def test_kept_lock_holds_the_instance_for_the_next_turns(provider: Provider) -> None:
    """An ack with ``keep_lock`` keeps the lock: no fetch takes the instance, the same token acks again."""
    item, _ = await _held_turn(provider, "i")
    assert await _event_ids(provider, "i") == [1, 2]
    await assert_no_orchestration_work(provider)
    await ack_ok(provider, ack_for(item, history=[raised(3)], keep_lock=LEASE))  # kept again
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    await assert_no_orchestration_work(provider)
    await ack_ok(provider, ack_for(item, history=[raised(4)]))
    assert await _event_ids(provider, "i") == [1, 2, 3, 4]
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)
    await ack_fails(provider, ack_for(item, history=[raised(5)]))


@direct_dispatch
async def test_kept_lock_renews_and_abandons(provider: Provider) -> None:
    """A kept lock's token renews and abandons like a fetched one's; once abandoned, a fetch takes it."""
    item, _ = await _held_turn(provider, "i")
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    await provider.renew_orchestration_lock(item.lock_token, LEASE)
    await assert_no_orchestration_work(provider)
    await provider.abandon_orchestration_item(item.lock_token)
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)
    await ack_fails(provider, ack_for(item, history=[raised(3)]))


@direct_dispatch
async def test_kept_lock_lapses_after_keep_lock_seconds(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A kept lock lasts ``keep_lock`` seconds from the commit; then a fetch takes the instance."""
    timeout = provider_factory.lock_timeout
    item, _ = await _held_turn(provider, "i", keep=timeout)  # fetched with a far longer lease
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    await asyncio.sleep(timeout / 2)
    await assert_no_orchestration_work(provider)
    await asyncio.sleep(timeout / 2 + provider_factory.timing_slack)
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)
    await ack_fails(provider, ack_for(item, history=[raised(3)]))


@direct_dispatch
async def test_message_waiting_at_commit_releases_a_kept_lock(provider: Provider) -> None:
    """A message that arrived during the turn makes ``keep_lock`` release: the token fails, it is fetched."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    await ack_ok(provider, ack_for(item, history=[raised(2)], keep_lock=LEASE))
    await raises_permanent(provider.renew_orchestration_lock(item.lock_token, LEASE))
    await ack_fails(provider, ack_for(item, history=[raised(3)]))
    assert await _event_ids(provider, "i") == [1, 2]
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)


@direct_dispatch
async def test_message_arriving_during_a_kept_lock_releases_it_at_the_next_ack(provider: Provider) -> None:
    """A message arriving while a lock is kept is fetched once the next ack commits, ``keep_lock`` or not."""
    item, lease = await _held_turn(provider, "i")
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    ack = ack_for(item, history=[raised(3)], completed_work_items=[lease.lock_token], keep_lock=LEASE)
    await ack_ok(provider, ack)
    await ack_fails(provider, ack_for(item, history=[raised(4)]))
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([late], 1)


@direct_dispatch
async def test_own_orchestrator_items_release_a_kept_lock(provider: Provider) -> None:
    """An ack's own visible orchestrator items for its instance make ``keep_lock`` release the lock too."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    own = event_message("i", '"own"')
    await ack_ok(provider, ack_for(item, history=[raised(2)], orchestrator_items=[own], keep_lock=LEASE))
    await ack_fails(provider, ack_for(item, history=[raised(3)]))
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([own], 1)


@direct_dispatch
async def test_future_and_foreign_messages_do_not_release_a_kept_lock(provider: Provider) -> None:
    """Messages not visible yet (timers), or for other instances, do not stop an ack keeping its lock."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await enqueue(provider, timer_message("i", now_ms() + 60_000, source_id=2))  # arrived during the turn
    sent = [timer_message("i", now_ms() + 60_000, source_id=3), event_message("other")]
    await ack_ok(provider, ack_for(item, history=[raised(2)], orchestrator_items=sent, keep_lock=LEASE))
    [fetched] = await fetch_items(provider)
    assert fetched.instance_id == "other", "an instance whose lock was kept was fetched"
    await ack_ok(provider, ack_for(item, history=[raised(3)]))  # the kept token still holds
    assert await _event_ids(provider, "i") == [1, 2, 3]


@direct_dispatch
async def test_failed_ack_with_keep_lock_leaves_the_lock_as_it_was(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """A failed ack with ``keep_lock`` does not extend the lock: it lapses when the fetch's lease does."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i", provider_factory.lock_timeout)
    await ack_fails(provider, ack_for(item, history=[raised(1)], keep_lock=LEASE))  # a duplicate event id
    await _lapse(provider_factory)
    again = await fetch_one(provider, "i")
    assert (again.messages, again.attempt_count) == ([event_message("i")], 2)


@direct_dispatch
async def test_completed_work_items_are_deleted_by_the_ack(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An ack deletes its ``completed_work_items``: they stay gone after their leases would have lapsed."""
    item, lease = await _held_turn(provider, "i", lease_timeout=provider_factory.lock_timeout)
    await ack_ok(provider, ack_for(item, history=[raised(3)], completed_work_items=[lease.lock_token]))
    assert await _event_ids(provider, "i") == [1, 2, 3]
    assert await provider.renew_work_item_locks([lease.lock_token], LEASE) == [False]
    await _lapse(provider_factory)
    await assert_no_work_items(provider)
    await ack_work_fails(provider, lease.lock_token, result_message("i", 2))
    await assert_no_orchestration_work(provider)


@direct_dispatch
async def test_fetched_and_direct_leases_complete_alike(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """Leases from a fetch and from a direct ack both work in ``completed_work_items``, in one ack."""
    timeout = provider_factory.lock_timeout
    await schedule_activities(provider, "i", 1)
    fetched = await fetch_one_work(provider, timeout)
    item, direct = await _held_turn(provider, "i", lease_timeout=timeout)
    tokens = [fetched.lock_token, direct.lock_token]
    await ack_ok(provider, ack_for(item, history=[raised(4)], completed_work_items=tokens))
    assert await provider.renew_work_item_locks(tokens, LEASE) == [False, False]
    await _lapse(provider_factory)
    await assert_no_work_items(provider)


@direct_dispatch
@pytest.mark.parametrize("loss", ["unknown", "acked", "lapsed", "taken"])
async def test_lost_completed_lease_fails_the_whole_ack(
    provider: Provider, provider_factory: ProviderFactory, loss: str
) -> None:
    """An ack with a completed lease not held fails permanently and changes nothing: its lock still holds."""
    await schedule_activities(provider, "i", 1)
    lost = await fetch_one_work(provider, provider_factory.lock_timeout)
    item, held = await _held_turn(provider, "i")
    if loss == "acked":
        await ack_work_ok(provider, lost)
    elif loss in ("lapsed", "taken"):
        await _lapse(provider_factory)
        if loss == "taken":
            assert (await fetch_one_work(provider)).item == lost.item
    token = "no-such-work-token" if loss == "unknown" else lost.lock_token
    new_work = activity("i", 5)
    failing = ack_for(
        item,
        history=[raised(4), scheduled(5)],
        worker_items=[new_work],
        orchestrator_items=[event_message("other")],
        completed_work_items=[held.lock_token, token],
        keep_lock=LEASE,
    )
    await ack_fails(provider, failing)
    assert await _event_ids(provider, "i") == [1, 2, 3]
    assert new_work not in [lease.item for lease in await fetch_work(provider)]
    await assert_no_orchestration_work(provider)  # no message for "other", and "i" still locked
    assert await provider.renew_work_item_locks([held.lock_token], LEASE) == [True]
    await ack_ok(provider, ack_for(item, history=[raised(4)], completed_work_items=[held.lock_token]))
    assert await _event_ids(provider, "i") == [1, 2, 3, 4]


@direct_dispatch
async def test_failed_ack_deletes_no_completed_work_items(provider: Provider) -> None:
    """An ack failing for another reason (duplicate event, lost lock) deletes no ``completed_work_items``."""
    item, lease = await _held_turn(provider, "i")
    await ack_fails(provider, ack_for(item, history=[raised(2)], completed_work_items=[lease.lock_token]))
    assert await provider.renew_work_item_locks([lease.lock_token], LEASE) == [True]
    await ack_ok(provider, ack_for(item, history=[raised(3)]))  # releases: the token is spent
    await ack_fails(provider, ack_for(item, history=[raised(4)], completed_work_items=[lease.lock_token]))
    assert await provider.renew_work_item_locks([lease.lock_token], LEASE) == [True]
    await ack_work_ok(provider, lease, result_message("i", 2))


@direct_dispatch
async def test_lost_completed_lease_fails_alone_in_a_batch(provider: Provider) -> None:
    """In a batch, only the ack with a lost completed lease fails; the others commit and delete theirs."""
    held = {instance_id: await _held_turn(provider, instance_id) for instance_id in ("a", "b", "c")}

    def turn(instance_id: str, token: str, **fields: object) -> OrchestrationAck:
        item = held[instance_id][0]
        return ack_for(item, history=[raised(3)], completed_work_items=[token], **fields)

    acks = [
        turn("a", held["a"][1].lock_token),
        turn("b", "no-such-work-token"),
        turn("c", held["c"][1].lock_token, keep_lock=LEASE),
    ]
    results = await provider.ack_orchestration_items(acks)
    assert len(results) == 3, f"3 acks returned {len(results)} results"
    first, failed, last = results
    assert first is None, f"the first ack returned {first!r}"
    assert_permanent(failed)
    assert last is None, f"the last ack returned {last!r}"
    tokens = [held[instance_id][1].lock_token for instance_id in ("a", "b", "c")]
    assert await provider.renew_work_item_locks(tokens, LEASE) == [False, True, False]
    assert [await _event_ids(provider, instance_id) for instance_id in ("a", "b", "c")] == [
        [1, 2, 3],
        [1, 2],
        [1, 2, 3],
    ]


@requires_capability("wakeups")
@direct_dispatch
async def test_kept_lock_released_for_waiting_messages_wakes_waiters(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """With wake-ups, a ``keep_lock`` ack releasing because a message waits wakes orchestrator waiters."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    late = event_message("i", '"late"')
    await enqueue(provider, late)
    parked = asyncio.Event()

    async def dispatcher() -> OrchestrationItem:
        while True:
            items = await provider.fetch_orchestration_items(1, LEASE)
            if items:
                return items[0]
            parked.set()
            await provider.wait_for_work("orchestrator", 30.0)

    task = asyncio.ensure_future(dispatcher())
    try:
        await asyncio.wait_for(parked.wait(), 30.0)  # it found the instance locked and waits
        await ack_ok(provider, ack_for(item, history=[raised(2)], keep_lock=LEASE))
        try:
            fetched = await asyncio.wait_for(asyncio.shield(task), provider_factory.wakeup_latency)
        except TimeoutError:
            pytest.fail(
                f"a lock released for a waiting message woke no one in {provider_factory.wakeup_latency}s"
            )
        assert fetched.messages == [late]
    finally:
        task.cancel()
