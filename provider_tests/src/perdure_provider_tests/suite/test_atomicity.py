"""Atomicity: an orchestration ack is one transaction; all of it commits, or none of it does."""

from __future__ import annotations

from perdure.provider import OrchestrationAck, Provider, WorkItemAck
from perdure_provider_tests.helpers import (
    ack_fails,
    ack_for,
    ack_ok,
    activity,
    assert_no_orchestration_work,
    assert_no_work_items,
    assert_permanent,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_one_work,
    raised,
    ref,
    result_message,
    schedule_activities,
    scheduled,
    start_instance,
    take_turn,
)


async def test_failed_ack_commits_nothing(provider: Provider) -> None:
    """An ack that fails commits nothing: no history, queued work, status, custom status or cancellation."""
    [queued] = await schedule_activities(provider, "i", 1)  # activity 2, event ids 1-2 stored
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    bad = ack_for(
        item,
        history=[raised(3), raised(2)],  # 2 is already stored
        worker_items=[activity("i", 4)],
        orchestrator_items=[event_message("elsewhere")],
        cancelled_activities=[ref(queued)],
        status="completed",
        output='"done"',
        custom_status_changed=True,
        custom_status='"s"',
    )
    await ack_fails(provider, bad)

    assert [e.event_id for e in await provider.read_history("i")] == [1, 2]
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.status, info.output, info.last_event_id) == ("running", None, 2)
    assert (info.custom_status, info.custom_status_version) == (None, 0)
    [lease] = await provider.fetch_work_items(10, 60)
    assert lease.item == queued  # not cancelled, and activity 4 not inserted
    assert await fetch_items(provider) == []  # "elsewhere" got nothing, and "i" is still locked


async def test_complex_ack_commits_everything_together(provider: Provider) -> None:
    """A successful ack commits history, new work, statuses, cancellations and consumption together."""
    [old] = await schedule_activities(provider, "i", 1)
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    new = activity("i", 4)
    ack = ack_for(
        item,
        history=[raised(3), scheduled(4)],
        worker_items=[new],
        orchestrator_items=[event_message("other", '"hello"')],
        cancelled_activities=[ref(old)],
        status="completed",
        output='"result"',
        custom_status_changed=True,
        custom_status='"finished"',
    )
    await ack_ok(provider, ack)

    assert [e.event_id for e in await provider.read_history("i")] == [1, 2, 3, 4]
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.status, info.output) == ("completed", '"result"')
    assert (info.custom_status, info.custom_status_version) == ('"finished"', 1)
    lease = await fetch_one_work(provider)
    assert lease.item == new
    await assert_no_work_items(provider)
    other = await fetch_one(provider, "other")
    assert other.messages == [event_message("other", '"hello"')]
    await assert_no_orchestration_work(provider)  # the consumed message of "i" is gone


async def test_failed_ack_keeps_the_lock(provider: Provider) -> None:
    """A failed ack keeps the lock: the instance stays locked and a corrected ack with its token commits."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await ack_fails(provider, ack_for(item, history=[raised(1)]))
    assert await fetch_items(provider) == []
    await provider.renew_orchestration_lock(item.lock_token, 60)
    await ack_ok(provider, ack_for(item, history=[raised(2)]))
    assert [e.event_id for e in await provider.read_history("i")] == [1, 2]
    await assert_no_orchestration_work(provider)


async def test_failed_ack_keeps_the_tagged_messages(provider: Provider) -> None:
    """A failed ack deletes none of the tagged messages: after an abandon they are delivered again."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i", '"a"'), event_message("i", '"b"'))
    item = await fetch_one(provider, "i")
    await ack_fails(provider, ack_for(item, history=[raised(1)]))
    await provider.abandon_orchestration_item(item.lock_token)
    again = await fetch_one(provider, "i")
    assert again.messages == item.messages


async def test_empty_ack_consumes_and_releases(provider: Provider) -> None:
    """An ack carrying only its token consumes the tagged messages and releases the lock."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    assert item.instance is not None
    empty = OrchestrationAck(
        lock_token=item.lock_token, instance_id="i", execution_id=1, name=item.instance.name
    )
    await ack_ok(provider, empty)
    await assert_no_orchestration_work(provider)
    await enqueue(provider, event_message("i"))
    await fetch_one(provider, "i")


async def test_second_orchestration_ack_with_one_token_fails(provider: Provider) -> None:
    """An instance lock commits once: a second ack with the same token fails permanently and adds nothing."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await ack_ok(provider, ack_for(item, history=[raised(2)]))
    await ack_fails(provider, ack_for(item, history=[raised(3)], worker_items=[activity("i", 3)]))
    assert [e.event_id for e in await provider.read_history("i")] == [1, 2]
    await assert_no_work_items(provider)


async def test_second_work_ack_with_one_token_fails(provider: Provider) -> None:
    """A lease completes once: a second ack with its token fails permanently and enqueues nothing."""
    await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    first = result_message("i", 2, result='"first"')
    second = result_message("i", 2, result='"second"')
    assert await provider.ack_work_items([WorkItemAck(lease.lock_token, first)]) == [None]
    [error] = await provider.ack_work_items([WorkItemAck(lease.lock_token, second)])
    assert_permanent(error)
    item = await fetch_one(provider, "i")
    assert item.messages == [first]


async def test_history_is_append_only_across_acks(provider: Provider) -> None:
    """History grows only by appending: each ack's events follow the stored ones, which never change."""
    await start_instance(provider, "i")
    original = await provider.read_history("i")
    for event_id in (2, 3, 4):
        await take_turn(provider, "i", history=[raised(event_id, f'"{event_id}"')])
    history = await provider.read_history("i")
    assert [e.event_id for e in history] == [1, 2, 3, 4]
    assert history[0] == original[0]
    assert [getattr(e, "data", None) for e in history[1:]] == ['"2"', '"3"', '"4"']
