"""Payloads: a provider returns exactly what it stored, for any id, type, text or size.

Instance ids are validated by the client before they reach a provider, but a provider must not
depend on that: quotes, SQL fragments, wildcards, slashes, unicode and long ids round-trip
verbatim. (NUL characters are left out: PostgreSQL text cannot hold them, and the client rejects
them.) Large payloads use ``capabilities.max_payload_bytes``, or the factory's
``max_payload_test_bytes`` when that is lower.
"""

from __future__ import annotations

import pytest

from perdure.history import (
    ActivityCancelled,
    ActivityCompleted,
    ActivityError,
    ActivityFailed,
    ActivityResult,
    ActivityScheduled,
    CancelInstance,
    CancelRequested,
    ContinueAsNew,
    CustomStatusSet,
    ErrorDetails,
    Event,
    EventRaised,
    EventSubscribed,
    EventSubscriptionCancelled,
    Message,
    OrchestrationCancelled,
    OrchestrationCompleted,
    OrchestrationContinuedAsNew,
    OrchestrationFailed,
    OrchestrationStarted,
    ParentRef,
    RaiseEvent,
    StartOrchestration,
    SubOrchestrationCancelled,
    SubOrchestrationCompleted,
    SubOrchestrationError,
    SubOrchestrationFailed,
    SubOrchestrationResult,
    SubOrchestrationScheduled,
    TimerCreated,
    TimerElapsed,
    TimerFired,
)
from perdure.provider import Provider
from perdure_provider_tests.factory import ProviderFactory
from perdure_provider_tests.helpers import (
    ack_for,
    ack_ok,
    ack_work_ok,
    activity,
    enqueue,
    event_message,
    fetch_items,
    fetch_one,
    fetch_one_work,
    raised,
    result_message,
    schedule_activities,
    start_instance,
    start_message,
    started,
    take_turn,
)

HOSTILE_IDS: dict[str, str] = {
    "single-quote": "it's",
    "double-quote": 'say "hi"',
    "sql-injection": "'; DROP TABLE instances; --",
    "like-wildcards": "100%_done",
    "backslashes": "C:\\temp\\new",
    "slashes": "tenant/orders/2024/0001",
    "whitespace": "  spaced\tout\n",
    "unicode": "订单-Straße-ünïcødé",
    "emoji": "deploy-🚀-✅",
    "json-like": '{"id": [1, 2]}',
    "very-long": "long-" + "x" * 995,
}

TEXT = '"Hello, 世界! 🎉 e\u0301 \\u0000 literal, \\n escaped, real\nnewline, \ttab, \\"quoted\\" ключ 𝄞"'

ERROR = ErrorDetails(
    kind="application", type="ValueError", message="bad 'input' — ünï", traceback="Traceback:\n  line 1\n"
)
PARENT = ParentRef(instance_id="parent/1", execution_id=2, source_id=3)
T = 1_700_000_000_000

SAMPLE_EVENTS: list[Event] = [
    OrchestrationStarted(
        event_id=2,
        timestamp_ms=T,
        name="o",
        version="1",
        input=TEXT,
        parent=PARENT,
        initial_custom_status='"s"',
    ),
    OrchestrationCompleted(event_id=2, timestamp_ms=T, output=TEXT),
    OrchestrationFailed(event_id=2, timestamp_ms=T, error=ERROR),
    OrchestrationCancelled(event_id=2, timestamp_ms=T, reason="user asked"),
    OrchestrationContinuedAsNew(event_id=2, timestamp_ms=T, input=TEXT, version="2"),
    CancelRequested(event_id=2, timestamp_ms=T, reason="why not"),
    ActivityScheduled(event_id=2, timestamp_ms=T, name="a", input=TEXT),
    ActivityCompleted(event_id=2, timestamp_ms=T, source_id=1, result=TEXT),
    ActivityFailed(event_id=2, timestamp_ms=T, source_id=1, error=ERROR),
    ActivityCancelled(event_id=2, timestamp_ms=T, target_id=1, reason="lost the race"),
    TimerCreated(event_id=2, timestamp_ms=T, fire_at_ms=T + 5),
    TimerFired(event_id=2, timestamp_ms=T, source_id=1, fire_at_ms=T + 5),
    EventSubscribed(event_id=2, timestamp_ms=T, name="approval"),
    EventSubscriptionCancelled(event_id=2, timestamp_ms=T, target_id=1),
    EventRaised(event_id=2, timestamp_ms=T, name="approval", data=TEXT),
    SubOrchestrationScheduled(
        event_id=2, timestamp_ms=T, name="child", instance_id="c/1", input=TEXT, version="3"
    ),
    SubOrchestrationCompleted(event_id=2, timestamp_ms=T, source_id=1, result=TEXT),
    SubOrchestrationFailed(event_id=2, timestamp_ms=T, source_id=1, error=ERROR),
    SubOrchestrationCancelled(event_id=2, timestamp_ms=T, target_id=1, reason="parent cancelled"),
    CustomStatusSet(event_id=2, timestamp_ms=T, status=None),
]

SAMPLE_MESSAGES: list[Message] = [
    StartOrchestration(instance_id="m", name="o", input=TEXT, version="1", parent=PARENT),
    ContinueAsNew(
        instance_id="m",
        execution_id=2,
        name="o",
        input=TEXT,
        version=None,
        parent=PARENT,
        initial_custom_status="",
    ),
    ActivityResult(instance_id="m", execution_id=1, source_id=2, result=TEXT),
    ActivityError(instance_id="m", execution_id=1, source_id=2, error=ERROR),
    TimerElapsed(instance_id="m", execution_id=1, source_id=2, fire_at_ms=T),
    SubOrchestrationResult(instance_id="m", execution_id=1, source_id=2, result=TEXT),
    SubOrchestrationError(instance_id="m", execution_id=1, source_id=2, error=ERROR),
    RaiseEvent(instance_id="m", name="approval", data=TEXT),
    CancelInstance(instance_id="m", reason="enough"),
]


@pytest.mark.parametrize("instance_id", list(HOSTILE_IDS.values()), ids=list(HOSTILE_IDS))
async def test_hostile_instance_ids_round_trip(provider: Provider, instance_id: str) -> None:
    """Instance ids round-trip verbatim through every call that stores or routes them."""
    await enqueue(provider, start_message(instance_id))
    item = await fetch_one(provider, instance_id)
    assert item.messages == [start_message(instance_id)]
    await ack_ok(provider, ack_for(item, history=[started()], status="running"))
    info = await provider.get_instance(instance_id)
    assert info is not None
    assert info.instance_id == instance_id
    assert [e.event_id for e in await provider.read_history(instance_id)] == [1]

    [scheduled_item] = await schedule_activities(provider, instance_id, 1)
    lease = await fetch_one_work(provider)
    assert lease.item == scheduled_item
    assert lease.ref.instance_id == instance_id
    await ack_work_ok(provider, lease, result_message(instance_id, scheduled_item.activity_id))
    assert (await fetch_one(provider)).instance_id == instance_id


async def test_ids_differing_only_in_special_characters_are_distinct(provider: Provider) -> None:
    """Ids that differ only in wildcard, quote, escape or letter-case characters are distinct instances."""
    ids = ["a%", "ab", "a_", "A%", "a'", "a''", "a\\", "a\\\\"]
    for n, instance_id in enumerate(ids):
        await start_instance(provider, instance_id, name=f"orch-{n}")
    for n, instance_id in enumerate(ids):
        info = await provider.get_instance(instance_id)
        assert info is not None
        assert (info.instance_id, info.name) == (instance_id, f"orch-{n}")
        assert len(await provider.read_history(instance_id)) == 1
    assert await provider.get_instance("a") is None
    assert await provider.get_instance("a%%") is None


LOCATIONS = ["history", "orchestrator-message", "work-item", "completion", "output", "custom-status"]


@pytest.mark.parametrize("where", LOCATIONS)
async def test_large_payload_round_trips(
    provider: Provider, provider_factory: ProviderFactory, where: str
) -> None:
    """A payload of the declared ``max_payload_bytes`` round-trips unchanged wherever it is stored."""
    size = provider_factory.payload_test_bytes(provider)
    body = "0123456789abcdef" * (size // 16 + 1)
    payload = '"' + body[: size - 2] + '"'
    assert len(payload.encode()) == size

    await start_instance(provider, "big")
    if where == "history":
        await take_turn(provider, "big", history=[raised(2, payload)])
        assert getattr((await provider.read_history("big"))[-1], "data", None) == payload
    elif where == "orchestrator-message":
        await enqueue(provider, event_message("big", payload))
        assert (await fetch_one(provider, "big")).messages == [event_message("big", payload)]
    elif where == "work-item":
        [scheduled_item] = await schedule_activities(provider, "big", 1, input=payload)
        assert (await fetch_one_work(provider)).item == scheduled_item
    elif where == "completion":
        await schedule_activities(provider, "big", 1)
        completion = result_message("big", 2, result=payload)
        await ack_work_ok(provider, await fetch_one_work(provider), completion)
        assert (await fetch_one(provider, "big")).messages == [completion]
    elif where == "output":
        await take_turn(provider, "big", status="completed", output=payload)
        info = await provider.get_instance("big")
        assert info is not None
        assert info.output == payload
    else:
        await take_turn(provider, "big", custom_status_changed=True, custom_status=payload)
        assert await provider.get_custom_status("big", 0) == (payload, 1)


async def test_unusual_text_round_trips_exactly(provider: Provider) -> None:
    """Text round-trips exactly: non-ASCII, emoji, combining marks, escapes, quotes, newlines."""
    await start_instance(provider, "i", input=TEXT, version=TEXT)
    await take_turn(
        provider,
        "i",
        history=[raised(2, TEXT, name=TEXT)],
        worker_items=[activity("i", 3, name=TEXT, input=TEXT)],
        orchestrator_items=[event_message("i", TEXT, name=TEXT)],
        custom_status_changed=True,
        custom_status=TEXT,
    )
    history = await provider.read_history("i")
    assert getattr(history[0], "input", None) == TEXT
    assert (getattr(history[1], "name", None), getattr(history[1], "data", None)) == (TEXT, TEXT)
    info = await provider.get_instance("i")
    assert info is not None
    assert (info.version, info.custom_status) == (TEXT, TEXT)
    assert (await fetch_one_work(provider)).item == activity("i", 3, name=TEXT, input=TEXT)
    assert (await fetch_one(provider, "i")).messages == [event_message("i", TEXT, name=TEXT)]


async def test_empty_string_and_none_stay_distinct(provider: Provider) -> None:
    """An empty string is not ``None``: both are stored and returned as given."""
    await start_instance(provider, "empty", version="")
    await take_turn(
        provider, "empty", custom_status_changed=True, custom_status="", status="completed", output=""
    )
    info = await provider.get_instance("empty")
    assert info is not None
    assert (info.version, info.custom_status, info.output) == ("", "", "")
    await start_instance(provider, "none", version=None)
    await take_turn(
        provider, "none", custom_status_changed=True, custom_status=None, status="completed", output=None
    )
    info = await provider.get_instance("none")
    assert info is not None
    assert (info.version, info.custom_status, info.output) == (None, None, None)


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: type(e).__name__)
async def test_every_event_type_round_trips(provider: Provider, event: Event) -> None:
    """Every history event type round-trips through an ack and ``read_history`` unchanged."""
    await start_instance(provider, "i")
    await take_turn(provider, "i", history=[event])
    assert (await provider.read_history("i"))[1] == event


@pytest.mark.parametrize("message", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
async def test_every_message_type_round_trips(provider: Provider, message: Message) -> None:
    """Every orchestrator message type round-trips through an enqueue and a fetch unchanged."""
    await enqueue(provider, message)
    assert (await fetch_one(provider, message.instance_id)).messages == [message]
    assert await fetch_items(provider) == []
