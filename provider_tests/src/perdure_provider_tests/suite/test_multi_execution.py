"""Multi-execution: continue-as-new starts a new execution of the same instance.

Each execution keeps its own history, every history stays readable, and the instance reports the
latest execution.
"""

from __future__ import annotations

from perdure.history import ContinueAsNew, ParentRef
from perdure.provider import Provider
from perdure_provider_tests.helpers import (
    continue_as_new,
    fetch_one,
    raised,
    start_instance,
    take_turn,
)


async def test_executions_have_separate_histories(provider: Provider) -> None:
    """Each execution has its own history: ``read_history`` with an execution id returns only it."""
    await start_instance(provider, "i", input='"one"')
    await take_turn(provider, "i", history=[raised(2)])
    await continue_as_new(provider, "i", '"two"')
    first = await provider.read_history("i", 1)
    second = await provider.read_history("i", 2)
    assert [e.event_id for e in first] == [1, 2, 3]
    assert [e.event_id for e in second] == [1]
    assert getattr(first[0], "input", None) == '"one"'
    assert getattr(second[0], "input", None) == '"two"'


async def test_read_history_defaults_to_the_latest_execution(provider: Provider) -> None:
    """``read_history`` without an execution id returns the latest execution's history."""
    await start_instance(provider, "i")
    await continue_as_new(provider, "i", '"two"')
    await take_turn(provider, "i", history=[raised(2, '"in two"')])
    assert await provider.read_history("i") == await provider.read_history("i", 2)


async def test_instance_reports_the_latest_execution(provider: Provider) -> None:
    """``get_instance`` reports the latest execution: its id, status and last event id."""
    await start_instance(provider, "i")
    await take_turn(provider, "i", history=[raised(2), raised(3)])
    await continue_as_new(provider, "i", '"two"')
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.execution_id, info.status, info.last_event_id) == (2, "running", 1)


async def test_event_ids_are_unique_per_execution(provider: Provider) -> None:
    """Event ids are unique per execution: a new execution reuses ids 1, 2, ... without an error."""
    await start_instance(provider, "i")
    await take_turn(provider, "i", history=[raised(2)])
    await continue_as_new(provider, "i", '"two"')
    await take_turn(provider, "i", history=[raised(2), raised(3)])
    assert [e.event_id for e in await provider.read_history("i", 2)] == [1, 2, 3]


async def test_histories_of_earlier_executions_persist(provider: Provider) -> None:
    """The histories of all earlier executions stay readable after several continue-as-new."""
    await start_instance(provider, "i", input='"0"')
    for n in range(1, 4):
        await continue_as_new(provider, "i", f'"{n}"')
    for execution_id in range(1, 5):
        history = await provider.read_history("i", execution_id)
        assert getattr(history[0], "input", None) == f'"{execution_id - 1}"'


async def test_unknown_execution_has_an_empty_history(provider: Provider) -> None:
    """``read_history`` of an execution that does not exist returns an empty list."""
    await start_instance(provider, "i")
    assert await provider.read_history("i", 2) == []
    assert await provider.read_history("i", 99) == []


async def test_continued_execution_reports_its_next_input(provider: Provider) -> None:
    """An execution that continued as new reports ``continued_as_new`` with the next input as output."""
    await start_instance(provider, "i")
    next_start = ContinueAsNew(
        instance_id="i", execution_id=2, name="conformance-orchestration", input='"next"'
    )
    await take_turn(
        provider, "i", status="continued_as_new", output='"next"', orchestrator_items=[next_start]
    )
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.execution_id, info.status, info.output) == (1, "continued_as_new", '"next"')
    item = await fetch_one(provider, "i")
    assert item.messages == [next_start]


async def test_new_execution_takes_the_version_of_its_ack(provider: Provider) -> None:
    """A new execution stores the version of its first ack: versions can change at continue-as-new."""
    await start_instance(provider, "i", version="1.0")
    await continue_as_new(provider, "i", '"two"', version="2.0")
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.execution_id, info.version) == (2, "2.0")


async def test_new_execution_keeps_the_instance_identity(provider: Provider) -> None:
    """A new execution keeps the instance's name, parent and creation time."""
    first = await start_instance(provider, "i", parent=ParentRef("p", 1, 2))
    await continue_as_new(provider, "i", '"two"')
    second = await provider.get_instance("i")
    assert second is not None
    assert (second.name, second.parent_instance_id, second.created_at_ms) == (
        first.name,
        "p",
        first.created_at_ms,
    )
