"""Cancellation: an orchestration ack cancels activities by identity, after inserting new work.

A worker learns its activity was cancelled when its ack or lease renewal fails permanently.
"""

from __future__ import annotations

from perdure.history import ActivityRef
from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    ack_work_fails,
    activity,
    assert_no_orchestration_work,
    assert_no_work_items,
    fetch_one_work,
    fetch_work,
    raises_permanent,
    ref,
    result_message,
    schedule_activities,
    scheduled,
    start_instance,
    take_turn,
)


async def test_cancel_deletes_a_queued_activity(provider: Provider) -> None:
    """An ack's ``cancelled_activities`` deletes the matching work item that no worker has leased yet."""
    [queued] = await schedule_activities(provider, "i", 1)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    await assert_no_work_items(provider)


async def test_cancel_deletes_a_leased_activity_and_its_ack_fails(provider: Provider) -> None:
    """Cancelling a leased activity deletes it: the worker's ack then fails permanently."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    await ack_work_fails(provider, lease.lock_token)


async def test_failed_ack_of_a_cancelled_activity_enqueues_nothing(provider: Provider) -> None:
    """The failing ack of a cancelled activity enqueues no completion."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    await ack_work_fails(provider, lease.lock_token, result_message("i", queued.activity_id))
    await assert_no_orchestration_work(provider)


async def test_renewal_of_a_cancelled_activity_reports_false(provider: Provider) -> None:
    """Renewing the lease of a cancelled activity reports False: the worker should stop it."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    assert await provider.renew_work_item_locks([lease.lock_token], 60) == [False]


async def test_abandon_of_a_cancelled_activity_fails(provider: Provider) -> None:
    """Abandoning a cancelled activity raises a permanent error."""
    [queued] = await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    await take_turn(provider, "i", cancelled_activities=[ref(queued)])
    await raises_permanent(provider.abandon_work_item(lease.lock_token))


async def test_schedule_and_cancel_in_one_ack_leaves_nothing(provider: Provider) -> None:
    """Scheduling and cancelling one activity in the same ack leaves nothing: insert, then cancel."""
    await start_instance(provider, "i")
    doomed = activity("i", 2)
    kept = activity("i", 3)
    await take_turn(
        provider,
        "i",
        history=[scheduled(2), scheduled(3)],
        worker_items=[doomed, kept],
        cancelled_activities=[ref(doomed)],
    )
    assert [lease.item for lease in await fetch_work(provider)] == [kept]


async def test_cancelling_a_missing_activity_is_harmless(provider: Provider) -> None:
    """Cancelling an activity that is not queued (already completed, or never scheduled) is not an error."""
    await start_instance(provider, "i")
    await take_turn(
        provider, "i", cancelled_activities=[ActivityRef("i", 1, 99), ActivityRef("nobody", 1, 2)]
    )


async def test_one_ack_cancels_several_activities(provider: Provider) -> None:
    """One ack may cancel several activities, leased or not; the others are untouched."""
    queued = await schedule_activities(provider, "i", 4)
    leased = await fetch_one_work(provider)
    assert leased.item == queued[0]
    await take_turn(provider, "i", cancelled_activities=[ref(queued[0]), ref(queued[2])])
    assert [lease.item for lease in await fetch_work(provider)] == [queued[1], queued[3]]


async def test_cancellation_matches_the_full_identity(provider: Provider) -> None:
    """Cancellation matches instance, execution and activity id; an item differing in any one survives."""
    await start_instance(provider, "i")
    await start_instance(provider, "j")
    target = activity("i", 5, execution_id=1)
    survivors = [activity("i", 5, execution_id=2), activity("i", 6, execution_id=1)]
    await take_turn(provider, "i", worker_items=[target, *survivors])
    [other] = await schedule_activities(provider, "j", 1)
    same_id_elsewhere = activity("j", other.activity_id)
    await take_turn(provider, "i", cancelled_activities=[ref(target), ActivityRef("i", 1, other.activity_id)])
    remaining = [lease.item for lease in await fetch_work(provider)]
    assert remaining == [*survivors, same_id_elsewhere]
