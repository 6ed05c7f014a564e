"""Instance creation: instances are created only by an ack, never by an enqueue."""

from __future__ import annotations

import asyncio

import pytest

from perdure.history import ParentRef
from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    ack_fails,
    ack_for,
    ack_ok,
    enqueue,
    event_message,
    fetch_one,
    now_ms,
    raised,
    start_instance,
    start_message,
    started,
    take_turn,
)

#: Long enough for a millisecond timestamp to advance between two acks.
CLOCK_TICK = 0.02


async def test_enqueue_does_not_create_the_instance(provider: Provider) -> None:
    """Enqueueing a StartOrchestration never creates the instance: it stays unknown until an ack."""
    await enqueue(provider, start_message("new"))
    assert await provider.get_instance("new") is None
    assert await provider.read_history("new") == []


async def test_fetched_item_of_an_uncreated_instance_has_no_instance(provider: Provider) -> None:
    """A fetched item for an instance that has not been created yet carries ``instance=None``."""
    await enqueue(provider, start_message("new"))
    item = await fetch_one(provider, "new")
    assert item.instance is None
    assert item.messages == [start_message("new")]


async def test_ack_without_history_creates_no_instance(provider: Provider) -> None:
    """An ack that records no history only consumes its messages: it creates no instance."""
    await enqueue(provider, event_message("ghost"))
    item = await fetch_one(provider, "ghost")
    await ack_ok(provider, ack_for(item, execution_id=0, name=""))
    assert await provider.get_instance("ghost") is None
    assert await provider.read_history("ghost") == []
    await enqueue(provider, start_message("ghost"))
    assert (await fetch_one(provider, "ghost")).instance is None


async def test_ack_with_a_status_but_no_history_creates_no_instance(provider: Provider) -> None:
    """An ack with a status or custom status but no history creates no instance either."""
    await enqueue(provider, event_message("ghost"))
    item = await fetch_one(provider, "ghost")
    ack = ack_for(item, execution_id=1, name="ghost", status="failed", output='"x"')
    ack.custom_status_changed, ack.custom_status = True, '"busy"'
    await ack_ok(provider, ack)
    assert await provider.get_instance("ghost") is None
    assert await provider.read_history("ghost") == []


async def test_first_ack_creates_the_instance_from_its_data(provider: Provider) -> None:
    """The first ack creates the instance with the ack's name, version, execution id and status."""
    before = now_ms()
    await enqueue(provider, start_message("new", name="orch-a", version="2.1"))
    item = await fetch_one(provider, "new")
    ack = ack_for(item, name="orch-a", version="2.1", history=[started(name="orch-a", version="2.1")])
    await ack_ok(provider, ack)
    after = now_ms()

    info = await provider.get_instance("new")
    assert info is not None
    assert (info.instance_id, info.name, info.version, info.execution_id) == ("new", "orch-a", "2.1", 1)
    assert info.status == "running"
    assert info.output is None
    assert info.parent_instance_id is None
    assert (info.custom_status, info.custom_status_version) == (None, 0)
    assert info.last_event_id == 1
    assert before - 1000 <= info.created_at_ms <= after + 1000


@pytest.mark.parametrize("version", [None, "", "1.0.0"], ids=["none", "empty", "semver"])
async def test_version_is_stored_exactly_as_acked(provider: Provider, version: str | None) -> None:
    """An instance's version is stored as acked: ``None`` stays ``None`` and ``""`` stays ``""``."""
    info = await start_instance(provider, "v", version=version)
    assert info.version == version
    stored = await provider.get_instance("v")
    assert stored is not None
    assert stored.version == version


async def test_parent_is_recorded_from_the_creating_ack(provider: Provider) -> None:
    """The creating ack's parent reference is stored as the instance's ``parent_instance_id``."""
    parent = ParentRef(instance_id="the-parent", execution_id=3, source_id=7)
    info = await start_instance(provider, "child", parent=parent)
    assert info.parent_instance_id == "the-parent"


async def test_child_started_by_a_parent_ack_is_created_by_its_own_ack(provider: Provider) -> None:
    """A child start enqueued by a parent's ack does not create the child; its own first ack does."""
    await start_instance(provider, "parent")
    parent_ref = ParentRef(instance_id="parent", execution_id=1, source_id=2)
    child_start = start_message("child", name="child-orch", parent=parent_ref)
    await take_turn(provider, "parent", orchestrator_items=[child_start])
    assert await provider.get_instance("child") is None

    item = await fetch_one(provider, "child")
    assert item.instance is None
    assert item.messages == [child_start]
    ack = ack_for(
        item, name="child-orch", parent=parent_ref, history=[started(name="child-orch")], status="running"
    )
    await ack_ok(provider, ack)
    child = await provider.get_instance("child")
    assert child is not None
    assert (child.name, child.parent_instance_id) == ("child-orch", "parent")


async def test_abandoned_start_creates_nothing(provider: Provider) -> None:
    """Abandoning the fetch of a start leaves the instance uncreated."""
    await enqueue(provider, start_message("new"))
    item = await fetch_one(provider, "new")
    await provider.abandon_orchestration_item(item.lock_token)
    assert await provider.get_instance("new") is None


async def test_failed_creating_ack_creates_nothing(provider: Provider) -> None:
    """A creating ack that fails (here: two events with one id) leaves the instance uncreated."""
    await enqueue(provider, start_message("new"))
    item = await fetch_one(provider, "new")
    await ack_fails(provider, ack_for(item, history=[started(), raised(1)], status="running"))
    assert await provider.get_instance("new") is None
    assert await provider.read_history("new") == []


async def test_created_at_is_kept_and_updated_at_advances(provider: Provider) -> None:
    """``created_at_ms`` is set by the creating ack and kept; ``updated_at_ms`` advances with each ack."""
    first = await start_instance(provider, "i")
    await asyncio.sleep(CLOCK_TICK)
    await take_turn(provider, "i", history=[raised(2)])
    second = await provider.get_instance("i")
    assert second is not None
    assert second.created_at_ms == first.created_at_ms
    assert second.updated_at_ms > first.updated_at_ms
    assert second.updated_at_ms >= second.created_at_ms


async def test_unknown_instance_has_no_state(provider: Provider) -> None:
    """An unknown instance has no state: ``get_instance`` returns None and every history read is empty."""
    assert await provider.get_instance("nobody") is None
    assert await provider.read_history("nobody") == []
    assert await provider.read_history("nobody", 1) == []


async def test_last_event_id_is_the_highest_stored(provider: Provider) -> None:
    """``last_event_id`` is the highest event id stored for the current execution."""
    info = await start_instance(provider, "i")
    assert info.last_event_id == 1
    await take_turn(provider, "i", history=[raised(2), raised(3)])
    after = await provider.get_instance("i")
    assert after is not None
    assert after.last_event_id == 3


async def test_fetched_item_carries_the_current_instance_state(provider: Provider) -> None:
    """Once created, every fetched item carries the instance's stored state as ``get_instance`` reports it."""
    await start_instance(provider, "i", version="3")
    await take_turn(provider, "i", history=[raised(2)], custom_status_changed=True, custom_status='"busy"')
    await enqueue(provider, event_message("i"))
    item = await fetch_one(provider, "i")
    assert item.instance == await provider.get_instance("i")


async def test_status_and_output_are_applied_only_when_given(provider: Provider) -> None:
    """An ack with a status stores it with its output; an ack without a status leaves both unchanged."""
    await start_instance(provider, "i")
    await take_turn(provider, "i", history=[raised(2)], status="completed", output='{"total": 3}')
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.status, info.output) == ("completed", '{"total": 3}')

    await take_turn(provider, "i")  # e.g. a late message for a completed instance, consumed
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.status, info.output) == ("completed", '{"total": 3}')
