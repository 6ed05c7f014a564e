"""The durable record: history events and the queue messages that produce them.

History is the append-only list of events of one execution of an orchestration instance. Event
ids start at 1 (``OrchestrationStarted``) and grow by one per event. Completion events carry the
``source_id`` of the event that scheduled them, which is how replay matches results to calls.

Messages travel through the provider's two queues: ``StartOrchestration``, completions, timers,
raised events and cancellations go to the orchestrator queue (routed by ``instance_id``); an
``ActivityExecute`` goes to the worker queue. Providers store both as opaque JSON text plus the
routing columns exposed here as plain attributes, so a provider never inspects an event's kind.

Payload fields (inputs, results, event data) are JSON text produced by :mod:`perdure.serialization`;
history treats them as opaque strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

#: Version of the JSON layout written by :func:`encode_event` and :func:`encode_message`.
SCHEMA_VERSION = 1

ErrorKind = Literal["application", "timeout", "cancelled", "poison", "nondeterminism", "configuration"]


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """Why something failed, in a form that survives storage and crosses process boundaries."""

    kind: ErrorKind
    type: str
    message: str
    traceback: str | None = None

    def display(self) -> str:
        """One line a person can read: ``kind: Type: message``."""
        return f"{self.kind}: {self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class ParentRef:
    """Where a sub-orchestration reports its outcome: the parent's instance, execution and call."""

    instance_id: str
    execution_id: int
    source_id: int


# --------------------------------------------------------------------------------------------
# History events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every history event: its position in the execution and when it was written."""

    TYPE: ClassVar[str] = ""
    #: True for events recorded because orchestration code asked for them (matched on replay).
    DECISION: ClassVar[bool] = False
    #: True for events that end an execution.
    TERMINAL: ClassVar[bool] = False

    event_id: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion(Event):
    """An event that completes an earlier scheduling event, named by ``source_id``."""

    source_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestrationStarted(Event):
    """First event of every execution: what runs and with which input."""

    TYPE = "OrchestrationStarted"
    name: str
    version: str | None
    input: str
    parent: ParentRef | None = None
    initial_custom_status: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestrationCompleted(Event):
    """The orchestration returned ``output``."""

    TYPE = "OrchestrationCompleted"
    TERMINAL = True
    output: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestrationFailed(Event):
    """The orchestration raised, was poisoned, or was found nondeterministic."""

    TYPE = "OrchestrationFailed"
    TERMINAL = True
    error: ErrorDetails


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestrationCancelled(Event):
    """The instance was cancelled on request; outstanding work was cancelled with it."""

    TYPE = "OrchestrationCancelled"
    TERMINAL = True
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestrationContinuedAsNew(Event):
    """The execution ended and a new one starts with ``input`` (history is reset)."""

    TYPE = "OrchestrationContinuedAsNew"
    TERMINAL = True
    input: str
    version: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested(Event):
    """A client or a parent asked for this instance to be cancelled."""

    TYPE = "CancelRequested"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityScheduled(Event):
    """The orchestration called an activity; its ``event_id`` identifies the call."""

    TYPE = "ActivityScheduled"
    DECISION = True
    name: str
    input: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityCompleted(Completion):
    """An activity returned ``result``."""

    TYPE = "ActivityCompleted"
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityFailed(Completion):
    """An activity raised or was poisoned."""

    TYPE = "ActivityFailed"
    error: ErrorDetails


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityCancelled(Event):
    """The orchestration stopped waiting for an activity (a lost race or termination)."""

    TYPE = "ActivityCancelled"
    DECISION = True
    target_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerCreated(Event):
    """The orchestration started a durable timer that fires at ``fire_at_ms``."""

    TYPE = "TimerCreated"
    DECISION = True
    fire_at_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerFired(Completion):
    """A durable timer fired."""

    TYPE = "TimerFired"
    fire_at_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSubscribed(Event):
    """The orchestration started waiting for an external event called ``name``."""

    TYPE = "EventSubscribed"
    DECISION = True
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSubscriptionCancelled(Event):
    """The orchestration stopped waiting on a subscription (a lost race or termination)."""

    TYPE = "EventSubscriptionCancelled"
    DECISION = True
    target_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRaised(Event):
    """An external event arrived; it goes to the oldest open subscription of the same name."""

    TYPE = "EventRaised"
    name: str
    data: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationScheduled(Event):
    """The orchestration started a child orchestration and waits for its outcome."""

    TYPE = "SubOrchestrationScheduled"
    DECISION = True
    name: str
    instance_id: str
    input: str
    version: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationCompleted(Completion):
    """A child orchestration returned ``result``."""

    TYPE = "SubOrchestrationCompleted"
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationFailed(Completion):
    """A child orchestration failed or was cancelled."""

    TYPE = "SubOrchestrationFailed"
    error: ErrorDetails


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationCancelled(Event):
    """The orchestration stopped waiting for a child and asked it to cancel."""

    TYPE = "SubOrchestrationCancelled"
    DECISION = True
    target_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomStatusSet(Event):
    """The orchestration published a custom status (``None`` clears it)."""

    TYPE = "CustomStatusSet"
    DECISION = True
    status: str | None


# --------------------------------------------------------------------------------------------
# Queue messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every queue message; ``instance_id`` is the instance it is routed to."""

    TYPE: ClassVar[str] = ""
    instance_id: str

    @property
    def visible_at_ms(self) -> int | None:
        """When the message may be fetched; ``None`` means at once."""
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class StartOrchestration(Message):
    """Start execution 1 of an instance (from a client or a parent orchestration)."""

    TYPE = "StartOrchestration"
    name: str
    input: str
    version: str | None = None
    parent: ParentRef | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ContinueAsNew(Message):
    """Start the next execution of an instance that continued as new."""

    TYPE = "ContinueAsNew"
    execution_id: int
    name: str
    input: str
    version: str | None = None
    parent: ParentRef | None = None
    initial_custom_status: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionMessage(Message):
    """A message that only applies to one execution; stale ones are dropped by the runtime."""

    execution_id: int
    source_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityResult(ExecutionMessage):
    """An activity's return value, sent by the worker."""

    TYPE = "ActivityResult"
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityError(ExecutionMessage):
    """An activity's failure, sent by the worker."""

    TYPE = "ActivityError"
    error: ErrorDetails


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerElapsed(ExecutionMessage):
    """A durable timer, invisible in the queue until ``fire_at_ms``."""

    TYPE = "TimerElapsed"
    fire_at_ms: int

    @property
    def visible_at_ms(self) -> int | None:
        """Timers become visible when they are due."""
        return self.fire_at_ms


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationResult(ExecutionMessage):
    """A child's return value, routed to the parent instance."""

    TYPE = "SubOrchestrationResult"
    result: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SubOrchestrationError(ExecutionMessage):
    """A child's failure or cancellation, routed to the parent instance."""

    TYPE = "SubOrchestrationError"
    error: ErrorDetails


@dataclass(frozen=True, slots=True, kw_only=True)
class RaiseEvent(Message):
    """An external event raised by a client."""

    TYPE = "RaiseEvent"
    name: str
    data: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelInstance(Message):
    """Ask an instance to cancel (from a client or a cancelled parent)."""

    TYPE = "CancelInstance"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityExecute:
    """A unit of work on the worker queue: run activity ``name`` for one scheduled call.

    ``(instance_id, execution_id, activity_id)`` identifies the call; an orchestration ack may
    cancel it by that identity, which deletes the row and tells a running worker to stop.
    """

    TYPE: ClassVar[str] = "ActivityExecute"
    instance_id: str
    execution_id: int
    activity_id: int
    name: str
    input: str


@dataclass(frozen=True, slots=True)
class ActivityRef:
    """The identity of one scheduled activity call, used to cancel it."""

    instance_id: str
    execution_id: int
    activity_id: int


# --------------------------------------------------------------------------------------------
# JSON encoding
# --------------------------------------------------------------------------------------------

_EVENT_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (
        OrchestrationStarted,
        OrchestrationCompleted,
        OrchestrationFailed,
        OrchestrationCancelled,
        OrchestrationContinuedAsNew,
        CancelRequested,
        ActivityScheduled,
        ActivityCompleted,
        ActivityFailed,
        ActivityCancelled,
        TimerCreated,
        TimerFired,
        EventSubscribed,
        EventSubscriptionCancelled,
        EventRaised,
        SubOrchestrationScheduled,
        SubOrchestrationCompleted,
        SubOrchestrationFailed,
        SubOrchestrationCancelled,
        CustomStatusSet,
    )
}

_MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        StartOrchestration,
        ContinueAsNew,
        ActivityResult,
        ActivityError,
        TimerElapsed,
        SubOrchestrationResult,
        SubOrchestrationError,
        RaiseEvent,
        CancelInstance,
        ActivityExecute,
    )
}

_NESTED: dict[str, type[Any]] = {"error": ErrorDetails, "parent": ParentRef}
#: One shared compact encoder: ``json.dumps`` with options builds a new one on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_FIELDS: dict[type[Any], tuple[str, ...]] = {}

T = TypeVar("T")


class DecodeError(ValueError):
    """Stored text is not a valid event or message (corrupt, or written by a newer version)."""


def _fields(cls: type[Any]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": obj.TYPE}
    for name in _fields(type(obj)):
        value = getattr(obj, name)
        if name in _NESTED and value is not None:
            value = {n: getattr(value, n) for n in _fields(type(value))}
        out[name] = value
    return out


def _from_dict(data: Any, registry: dict[str, type[T]], what: str) -> T:
    if not isinstance(data, dict):
        raise DecodeError(f"a stored {what} must be a JSON object, got {type(data).__name__}")
    kind = data.pop("type", None)
    data.pop("v", None)
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise DecodeError(
            f"unknown {what} type {kind!r}: the store was written by a newer perdure or is corrupt"
        )
    try:
        for name, nested in _NESTED.items():
            value = data.get(name)
            if isinstance(value, dict):
                data[name] = nested(**value)
        return cls(**data)
    except TypeError as exc:
        raise DecodeError(f"malformed {what} {kind}: {exc}") from None


def encode_event(event: Event) -> str:
    """Serialise one history event to JSON text (with the schema version)."""
    data = _to_dict(event)
    data["v"] = SCHEMA_VERSION
    return _ENCODER.encode(data)


def decode_event(text: str | bytes) -> Event:
    """Parse JSON text written by :func:`encode_event`; raise :class:`DecodeError` if it is not one."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"history event is not valid JSON: {exc}") from None
    return _from_dict(data, _EVENT_TYPES, "history event")


def encode_message(message: Message | ActivityExecute) -> str:
    """Serialise one queue message to JSON text (with the schema version)."""
    data = _to_dict(message)
    data["v"] = SCHEMA_VERSION
    return _ENCODER.encode(data)


def decode_message(text: str | bytes) -> Message | ActivityExecute:
    """Parse JSON text written by :func:`encode_message`; raise :class:`DecodeError` if it is not one."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"queue message is not valid JSON: {exc}") from None
    result: Message | ActivityExecute = _from_dict(data, _MESSAGE_TYPES, "queue message")
    return result


def event_types() -> tuple[type[Event], ...]:
    """Every event class, for tools and tests that enumerate the model."""
    return tuple(_EVENT_TYPES.values())


def message_types() -> tuple[type[Any], ...]:
    """Every message class (orchestrator and worker queues)."""
    return tuple(_MESSAGE_TYPES.values())


__all__ = [
    "SCHEMA_VERSION",
    "ActivityCancelled",
    "ActivityCompleted",
    "ActivityError",
    "ActivityExecute",
    "ActivityFailed",
    "ActivityRef",
    "ActivityResult",
    "ActivityScheduled",
    "CancelInstance",
    "CancelRequested",
    "Completion",
    "ContinueAsNew",
    "CustomStatusSet",
    "DecodeError",
    "ErrorDetails",
    "Event",
    "EventRaised",
    "EventSubscribed",
    "EventSubscriptionCancelled",
    "ExecutionMessage",
    "Message",
    "OrchestrationCancelled",
    "OrchestrationCompleted",
    "OrchestrationContinuedAsNew",
    "OrchestrationFailed",
    "OrchestrationStarted",
    "ParentRef",
    "RaiseEvent",
    "StartOrchestration",
    "SubOrchestrationCancelled",
    "SubOrchestrationCompleted",
    "SubOrchestrationError",
    "SubOrchestrationFailed",
    "SubOrchestrationResult",
    "SubOrchestrationScheduled",
    "TimerCreated",
    "TimerElapsed",
    "TimerFired",
    "decode_event",
    "decode_message",
    "encode_event",
    "encode_message",
    "event_types",
    "message_types",
]
