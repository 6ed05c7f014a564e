"""Errors: every failure is a ProviderError that says whether retrying can help.

Bad tokens, duplicate event ids and corrupt data fail permanently, and corrupt data is reported,
never raised while a lock is held.
"""

from __future__ import annotations

import dataclasses

from perdure.history import ActivityError, ActivityRef, ErrorDetails
from perdure.provider import Provider, WorkItemAck
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    QueueDriver,
    ack_fails,
    ack_for,
    ack_ok,
    assert_no_orchestration_work,
    assert_no_work_items,
    assert_permanent,
    both_queues,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_one_work,
    raised,
    raises_permanent,
    requires_hook,
    retrying,
    schedule_activities,
    start_instance,
    started,
    take_turn,
)

BOGUS_TOKEN = "not-a-token-this-provider-issued"


@both_queues
async def test_ack_with_an_unknown_token_fails_permanently(provider: Provider, queue: QueueDriver) -> None:
    """An ack with a token the provider never issued fails permanently in its slot and changes nothing."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    assert_permanent(await queue.ack_one(provider, dataclasses.replace(handle, token=BOGUS_TOKEN)))
    assert await queue.ack_one(provider, handle) is None  # the real lock was untouched


@both_queues
async def test_abandon_with_an_unknown_token_raises(provider: Provider, queue: QueueDriver) -> None:
    """Abandoning with a token the provider never issued raises a permanent ProviderError."""
    await queue.put(provider, "i")
    handle = await queue.fetch_one(provider)
    await raises_permanent(queue.abandon(provider, dataclasses.replace(handle, token=BOGUS_TOKEN)))
    assert await queue.fetch(provider) == []  # the real lock was untouched


async def test_orchestration_renew_with_an_unknown_token_raises(provider: Provider) -> None:
    """Renewing an instance lock with an unknown token raises a permanent ProviderError."""
    await raises_permanent(provider.renew_orchestration_lock(BOGUS_TOKEN, 60))


async def test_work_renew_reports_each_token(provider: Provider) -> None:
    """A lease renewal reports False for an unknown token and True for a held one beside it."""
    await schedule_activities(provider, "i", 1)
    lease = await fetch_one_work(provider)
    assert await provider.renew_work_item_locks([BOGUS_TOKEN, lease.lock_token], 60) == [False, True]


async def test_duplicate_event_id_is_rejected_and_not_overwritten(provider: Provider) -> None:
    """An ack repeating a stored event id fails permanently; the stored event is not overwritten."""
    await start_instance(provider, "i", input='"original"')
    original = await provider.read_history("i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await ack_fails(provider, ack_for(item, history=[started(input='"overwritten?"')]))
    assert await provider.read_history("i") == original


async def test_duplicate_event_id_within_one_ack_is_rejected(provider: Provider) -> None:
    """An ack whose history holds one event id twice fails permanently and stores neither event."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    await ack_fails(provider, ack_for(item, history=[raised(2, '"a"'), raised(2, '"b"')]))
    assert [e.event_id for e in await provider.read_history("i")] == [1]


async def test_token_is_valid_only_for_its_instance(provider: Provider) -> None:
    """A token is valid only for the instance it locked: an ack naming another fails permanently."""
    await start_instance(provider, "a")
    await start_instance(provider, "b")
    await enqueue(provider, event_message("a"), event_message("b"))
    items = {item.instance_id: item for item in await fetch_items(provider)}
    assert set(items) == {"a", "b"}
    crossed = dataclasses.replace(ack_for(items["b"], history=[raised(2)]), lock_token=items["a"].lock_token)
    await ack_fails(provider, crossed)
    assert [e.event_id for e in await provider.read_history("b")] == [1]
    await ack_ok(provider, ack_for(items["a"]), ack_for(items["b"]))


@requires_hook("corrupt_queue_message")
async def test_undecodable_orchestrator_message_is_reported_on_the_item(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An undecodable message is reported in ``bad_messages``, never raised, and deleted by the ack."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i", '"corrupted"'))
    await provider_factory.corrupt_queue_message(provider, "i")
    good = event_message("i", '"fine"')
    await enqueue(provider, good)
    item = await fetch_one(provider, "i")
    assert item.messages == [good]
    assert len(item.bad_messages) == 1
    assert all(isinstance(text, str) and text for text in item.bad_messages)
    await provider.renew_orchestration_lock(item.lock_token, 60)  # the lock is held
    await ack_ok(provider, ack_for(item))
    await assert_no_orchestration_work(provider)


@requires_hook("corrupt_queue_message")
async def test_undecodable_work_item_is_leased_with_its_routing(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An undecodable work item is leased with ``item=None``, a ``decode_error`` and its ``ref``."""
    [queued] = await schedule_activities(provider, "i", 1)
    await provider_factory.corrupt_queue_message(provider, "i")
    lease = await fetch_one_work(provider)
    assert lease.item is None
    assert isinstance(lease.decode_error, str)
    assert lease.decode_error
    assert lease.ref == ActivityRef(queued.instance_id, queued.execution_id, queued.activity_id)
    failure = ActivityError(
        instance_id="i",
        execution_id=1,
        source_id=queued.activity_id,
        error=ErrorDetails(kind="poison", type="DecodeError", message=lease.decode_error),
    )
    assert await provider.ack_work_items([WorkItemAck(lease.lock_token, failure)]) == [None]
    await assert_no_work_items(provider)
    assert (await fetch_one(provider, "i")).messages == [failure]


@requires_hook("corrupt_history")
async def test_undecodable_history_fails_the_read(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """``read_history`` raises a permanent ProviderError for an undecodable event instead of dropping it."""
    await start_instance(provider, "i")
    await provider_factory.corrupt_history(provider, "i")
    await raises_permanent(provider.read_history("i"))


@requires_hook("corrupt_history")
async def test_instance_with_undecodable_history_is_still_fetched(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An instance whose history cannot be decoded is still fetched and locked: the fetch never raises."""
    await start_instance(provider, "i")
    await provider_factory.corrupt_history(provider, "i")
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    assert item.messages == [event_message("i")]
    await provider.renew_orchestration_lock(item.lock_token, 60)


@requires_hook("corrupt_history")
async def test_ack_appends_to_undecodable_history(
    provider: Provider, provider_factory: ProviderFactory
) -> None:
    """An ack appends to a history it cannot decode: it never re-reads or rewrites stored events."""
    await start_instance(provider, "i")
    await provider_factory.corrupt_history(provider, "i")
    await take_turn(provider, "i", history=[raised(2)], status="failed", output='"poisoned"')
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.last_event_id, info.status) == (2, "failed")


@requires_hook("drop_connections")
async def test_recovers_after_connections_drop(provider: Provider, provider_factory: ProviderFactory) -> None:
    """After its connections drop, a provider fails only retryably, then recovers with state intact."""
    await start_instance(provider, "i")
    await enqueue(provider, event_message("i"))
    await provider_factory.drop_connections(provider)

    item = await retrying(lambda: fetch_one(provider, "i"))
    assert item.messages == [event_message("i")]
    await retrying(lambda: ack_ok(provider, ack_for(item, history=[raised(2)])))
    history = await retrying(lambda: provider.read_history("i"))
    assert [e.event_id for e in history] == [1, 2]
    await retrying(lambda: enqueue(provider, event_message("i", '"after"')))
    again = await retrying(lambda: fetch_one(provider, "i"))
    assert again.messages == [event_message("i", '"after"')]
