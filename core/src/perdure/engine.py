"""The replay engine: drives an ``async def`` orchestration from its history, with no event loop.

An orchestration coroutine is stepped with ``send()``. Every durable awaitable (an activity, a
timer, an external event, a child orchestration, a join or select) is a :class:`DurableFuture`
whose ``__await__`` yields the future itself to the engine; awaiting anything else is reported
as :class:`~perdure.errors.NonDurableAwait`.

The engine owns a ready queue of engine tasks: the orchestration body plus every coroutine passed
to ``ctx.all`` / ``ctx.any`` (an "async block"). It consumes history one event at a time and, after
each completion, runs the ready tasks until none can move. That single rule makes joins and
selects resolve in history order, never in polling order, and lets replay and live execution share
one code path: a live turn is the same loop fed with events made from new messages.

Calls made by the code ("actions") are queued in order. On replay each recorded decision event
must match the next queued action, or the engine raises
:class:`~perdure.errors.NondeterminismError` with a message naming the orchestration, the step,
what the code did and what history says. Live, each action is recorded as a new event at once,
together with its side effects (worker items, timers, child starts, cancellations).

An engine may outlive a turn: the runtime caches it, and the next turn only feeds it the new
messages, reading no history and replaying nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random as _random
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from perdure import history as h
from perdure.errors import (
    ActivityFailed,
    NondeterminismError,
    NonDurableAwait,
    SubOrchestrationFailed,
    TaskCancelled,
)
from perdure.limits import LimitExceeded, check_payload
from perdure.provider import ExecutionStatus, encode_error
from perdure.serialization import SerializationError, dumps

T = TypeVar("T")

_PENDING, _DONE, _CANCELLED = 0, 1, 2
_GUID_NAMESPACE = uuid.UUID("7c1c5f5e-4bb7-4d2c-9d1a-8b1f3cde0a11")


class ContinueAsNewSignal(BaseException):
    """Raised by ``ctx.continue_as_new``; a BaseException so ``except Exception`` can't swallow it."""

    def __init__(self, input_text: str, version: str | None) -> None:
        super().__init__("continue_as_new")
        self.input_text = input_text
        self.version = version


# --------------------------------------------------------------------------------------------
# Durable futures
# --------------------------------------------------------------------------------------------


class DurableFuture(Generic[T]):
    """A result the orchestration can await that the engine resolves from history.

    Futures are created by the context (``ctx.call_activity`` and friends); the scheduling
    happens at creation, awaiting only waits. Awaiting a cancelled future raises
    :class:`~perdure.errors.TaskCancelled`.
    """

    __slots__ = ("_callbacks", "_error", "_state", "_value")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[DurableFuture[Any]], None]] = []

    def done(self) -> bool:
        """True once resolved, failed or cancelled."""
        return self._state != _PENDING

    def cancelled(self) -> bool:
        """True if the future was cancelled (e.g. it lost a ``ctx.any`` race)."""
        return self._state == _CANCELLED

    def __await__(self) -> Generator[DurableFuture[Any], None, T]:
        if self._state == _PENDING:
            yield self
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value

    def _add_callback(self, callback: Callable[[DurableFuture[Any]], None]) -> None:
        if self._state == _PENDING:
            self._callbacks.append(callback)
        else:
            callback(self)

    def _settle(self, state: int, value: Any, error: BaseException | None) -> None:
        if self._state != _PENDING:
            return
        self._state, self._value, self._error = state, value, error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def _resolve(self, value: Any) -> None:
        self._settle(_DONE, value, None)

    def _fail(self, error: BaseException) -> None:
        self._settle(_DONE, None, error)

    def _cancel(self, reason: str) -> None:
        """Stop waiting for this future; subclasses also cancel the work behind it."""
        self._settle(_CANCELLED, None, TaskCancelled(reason))


class ScheduledFuture(DurableFuture[T]):
    """A future backed by one recorded decision (activity, timer, subscription or child)."""

    __slots__ = ("child_id", "decode", "engine", "event_id", "kind", "label", "name")

    def __init__(self, engine: Engine, kind: str, name: str, decode: Callable[[str], Any]) -> None:
        super().__init__()
        self.engine = engine
        self.kind = kind
        self.name = name
        self.label = f"{kind} {name!r}" if name else f"a {kind}"
        self.decode = decode
        self.event_id = 0
        self.child_id = ""

    def _cancel(self, reason: str) -> None:
        if self._state != _PENDING:
            return
        super()._cancel(reason)
        self.engine._on_scheduled_cancelled(self, reason)


class _TaskFuture(DurableFuture[T]):
    __slots__ = ("task",)

    def __init__(self, task: _Task) -> None:
        super().__init__()
        self.task = task

    def _cancel(self, reason: str) -> None:
        if self._state != _PENDING:
            return
        super()._cancel(reason)
        self.task.engine._cancel_task(self.task, reason)


class _AllFuture(DurableFuture[list[Any]]):
    __slots__ = ("_children", "_remaining", "_return_exceptions")

    def __init__(self, children: list[DurableFuture[Any]], return_exceptions: bool) -> None:
        super().__init__()
        self._children = children
        self._return_exceptions = return_exceptions
        self._remaining = len(children)
        if not children:
            self._resolve([])
        for child in children:
            child._add_callback(self._child_done)

    def _child_done(self, child: DurableFuture[Any]) -> None:
        if self._state != _PENDING:
            return
        if child._error is not None and not self._return_exceptions:
            self._fail(child._error)
            return
        self._remaining -= 1
        if self._remaining == 0:
            self._resolve([c._error if c._error is not None else c._value for c in self._children])

    def _cancel(self, reason: str) -> None:
        if self._state != _PENDING:
            return
        super()._cancel(reason)
        for child in self._children:
            child._cancel(reason)


class _AnyFuture(DurableFuture[tuple[int, Any]]):
    __slots__ = ("_children",)

    def __init__(self, children: list[DurableFuture[Any]]) -> None:
        super().__init__()
        if not children:
            raise ValueError("ctx.any() needs at least one awaitable")
        self._children = children
        for index, child in enumerate(children):
            child._add_callback(functools.partial(self._child_done, index))

    def _child_done(self, index: int, child: DurableFuture[Any]) -> None:
        if self._state != _PENDING:
            return
        if child._error is not None:
            self._fail(child._error)
        else:
            self._resolve((index, child._value))
        for other in self._children:
            if other is not child:
                other._cancel("lost a race in ctx.any()")

    def _cancel(self, reason: str) -> None:
        if self._state != _PENDING:
            return
        super()._cancel(reason)
        for child in self._children:
            child._cancel(reason)


@dataclass(eq=False)
class _Task:
    """An engine task: one coroutine stepped by the engine (the body or an async block)."""

    engine: Engine
    coro: Coroutine[Any, Any, Any]
    future: _TaskFuture[Any] = field(init=False)
    waiting: DurableFuture[Any] | None = None
    closed: bool = False

    def __post_init__(self) -> None:
        self.future = _TaskFuture(self)


# --------------------------------------------------------------------------------------------
# Actions: what the code asked for, matched against or recorded into history
# --------------------------------------------------------------------------------------------


class _Action:
    """One call the orchestration made that becomes exactly one decision event."""

    __slots__ = ()

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        raise NotImplementedError

    def matches(self, event: h.Event) -> bool:
        raise NotImplementedError

    def bind(self, engine: Engine, event: h.Event) -> None:
        """Connect the action to its (recorded or replayed) event."""

    def effects(self, engine: Engine, event: h.Event) -> None:
        """Side effects of recording the action live (work items, cancellations)."""

    def describe(self) -> str:
        raise NotImplementedError


class _CallActivity(_Action):
    __slots__ = ("future", "input", "name")

    def __init__(self, future: ScheduledFuture[Any], name: str, input_text: str) -> None:
        self.future, self.name, self.input = future, name, input_text

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        return h.ActivityScheduled(event_id=event_id, timestamp_ms=ts, name=self.name, input=self.input)

    def matches(self, event: h.Event) -> bool:
        return (
            isinstance(event, h.ActivityScheduled) and event.name == self.name and event.input == self.input
        )

    def bind(self, engine: Engine, event: h.Event) -> None:
        engine._bind_open(self.future, event.event_id)

    def effects(self, engine: Engine, event: h.Event) -> None:
        engine._turn.worker_items.append(
            h.ActivityExecute(
                instance_id=engine.instance_id,
                execution_id=engine.execution_id,
                activity_id=event.event_id,
                name=self.name,
                input=self.input,
            )
        )

    def describe(self) -> str:
        return f"calls activity {self.name!r} with input {_short(self.input)}"


class _CreateTimer(_Action):
    __slots__ = ("fire_at_ms", "future")

    def __init__(self, future: ScheduledFuture[Any], fire_at_ms: int) -> None:
        self.future, self.fire_at_ms = future, fire_at_ms

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        return h.TimerCreated(event_id=event_id, timestamp_ms=ts, fire_at_ms=self.fire_at_ms)

    def matches(self, event: h.Event) -> bool:
        return isinstance(event, h.TimerCreated)

    def bind(self, engine: Engine, event: h.Event) -> None:
        engine._bind_open(self.future, event.event_id)

    def effects(self, engine: Engine, event: h.Event) -> None:
        assert isinstance(event, h.TimerCreated)
        engine._turn.orchestrator_items.append(
            h.TimerElapsed(
                instance_id=engine.instance_id,
                execution_id=engine.execution_id,
                source_id=event.event_id,
                fire_at_ms=event.fire_at_ms,
            )
        )

    def describe(self) -> str:
        return "creates a timer"


class _Subscribe(_Action):
    __slots__ = ("future", "name")

    def __init__(self, future: ScheduledFuture[Any], name: str) -> None:
        self.future, self.name = future, name

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        return h.EventSubscribed(event_id=event_id, timestamp_ms=ts, name=self.name)

    def matches(self, event: h.Event) -> bool:
        return isinstance(event, h.EventSubscribed) and event.name == self.name

    def bind(self, engine: Engine, event: h.Event) -> None:
        self.future.event_id = event.event_id
        if not self.future.done():
            engine._subscriptions.setdefault(self.name, deque()).append(self.future)

    def describe(self) -> str:
        return f"waits for event {self.name!r}"


class _CallSubOrchestration(_Action):
    __slots__ = ("future", "input", "instance_id", "name", "version")

    def __init__(
        self,
        future: ScheduledFuture[Any],
        name: str,
        instance_id: str | None,
        input_text: str,
        version: str | None,
    ) -> None:
        self.future, self.name, self.instance_id = future, name, instance_id
        self.input, self.version = input_text, version

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        child = self.instance_id or f"{engine.instance_id}:{event_id}"
        return h.SubOrchestrationScheduled(
            event_id=event_id,
            timestamp_ms=ts,
            name=self.name,
            instance_id=child,
            input=self.input,
            version=self.version,
        )

    def matches(self, event: h.Event) -> bool:
        return (
            isinstance(event, h.SubOrchestrationScheduled)
            and event.name == self.name
            and event.input == self.input
        )

    def bind(self, engine: Engine, event: h.Event) -> None:
        assert isinstance(event, h.SubOrchestrationScheduled)
        self.future.child_id = event.instance_id
        engine._bind_open(self.future, event.event_id)

    def effects(self, engine: Engine, event: h.Event) -> None:
        assert isinstance(event, h.SubOrchestrationScheduled)
        engine._turn.orchestrator_items.append(
            h.StartOrchestration(
                instance_id=event.instance_id,
                name=self.name,
                input=self.input,
                version=self.version,
                parent=h.ParentRef(engine.instance_id, engine.execution_id, event.event_id),
            )
        )

    def describe(self) -> str:
        return f"calls sub-orchestration {self.name!r} with input {_short(self.input)}"


class _Cancel(_Action):
    """A breadcrumb that the code stopped waiting for a scheduled future."""

    __slots__ = ("reason", "target")

    def __init__(self, target: ScheduledFuture[Any], reason: str) -> None:
        self.target, self.reason = target, reason

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        target_id = self.target.event_id
        if self.target.kind == "activity":
            return h.ActivityCancelled(
                event_id=event_id, timestamp_ms=ts, target_id=target_id, reason=self.reason
            )
        if self.target.kind == "suborchestration":
            return h.SubOrchestrationCancelled(
                event_id=event_id, timestamp_ms=ts, target_id=target_id, reason=self.reason
            )
        return h.EventSubscriptionCancelled(event_id=event_id, timestamp_ms=ts, target_id=target_id)

    def matches(self, event: h.Event) -> bool:
        expected = {
            "activity": h.ActivityCancelled,
            "suborchestration": h.SubOrchestrationCancelled,
            "event": h.EventSubscriptionCancelled,
        }[self.target.kind]
        return isinstance(event, expected) and getattr(event, "target_id", None) == self.target.event_id

    def effects(self, engine: Engine, event: h.Event) -> None:
        if self.target.kind == "activity":
            engine._turn.cancelled_activities.append(
                h.ActivityRef(engine.instance_id, engine.execution_id, self.target.event_id)
            )
        elif self.target.kind == "suborchestration":
            engine._turn.orchestrator_items.append(
                h.CancelInstance(instance_id=self.target.child_id, reason=f"parent {self.reason}")
            )

    def describe(self) -> str:
        return f"stops waiting for {self.target.label}"


class _SetStatus(_Action):
    __slots__ = ("status",)

    def __init__(self, status: str | None) -> None:
        self.status = status

    def make(self, engine: Engine, event_id: int, ts: int) -> h.Event:
        return h.CustomStatusSet(event_id=event_id, timestamp_ms=ts, status=self.status)

    def matches(self, event: h.Event) -> bool:
        return isinstance(event, h.CustomStatusSet)

    def effects(self, engine: Engine, event: h.Event) -> None:
        engine._turn.custom_status_changed = True
        engine._turn.custom_status = self.status

    def describe(self) -> str:
        return "sets the custom status"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_event(event: h.Event) -> str:
    if isinstance(event, h.ActivityScheduled):
        return f"activity {event.name!r} called with input {_short(event.input)}"
    if isinstance(event, h.SubOrchestrationScheduled):
        return f"sub-orchestration {event.name!r} called with input {_short(event.input)}"
    if isinstance(event, h.EventSubscribed):
        return f"a wait for event {event.name!r}"
    if isinstance(event, h.TimerCreated):
        return "a timer"
    if isinstance(event, h.CustomStatusSet):
        return "a custom status update"
    target = getattr(event, "target_id", None)
    return f"{event.TYPE}" + (f" of event {target}" if target is not None else "")


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """What one turn produced: the history delta and everything the ack must commit."""

    new_events: list[h.Event] = field(default_factory=list)
    worker_items: list[h.ActivityExecute] = field(default_factory=list)
    orchestrator_items: list[h.Message] = field(default_factory=list)
    cancelled_activities: list[h.ActivityRef] = field(default_factory=list)
    status: ExecutionStatus | None = None
    output: str | None = None
    custom_status_changed: bool = False
    custom_status: str | None = None
    dropped: list[str] = field(default_factory=list)


OrchestrationBody = Callable[["Engine", str], Coroutine[Any, Any, Any]]


class Engine:
    """Replays and advances one execution of one orchestration instance.

    ``body(engine, input_text)`` builds the orchestration coroutine (the context wraps the
    user's function); the engine never imports user code itself. ``version`` is the version the
    runtime resolved for the code it runs; a new execution pins it in ``OrchestrationStarted``.
    """

    def __init__(
        self,
        *,
        instance_id: str,
        execution_id: int,
        name: str,
        body: OrchestrationBody,
        version: str | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.execution_id = execution_id
        self.name = name
        #: The version a new execution records when its start message names none.
        self.version: str | None = version
        self.parent: h.ParentRef | None = None
        self.input = ""
        self._body = body
        self.last_event_id = 0
        self.now_ms = 0
        self.replaying = False
        self.started = False
        self.finished = False
        self.custom_status: str | None = None
        self._actions: deque[_Action] = deque()
        self._ready: deque[_Task] = deque()
        #: Tasks not finished yet, in creation order (a dict: deterministic iteration); closed ones
        #: leave, so a long-lived instance does not grow.
        self._tasks: dict[_Task, None] = {}
        self._open: dict[int, ScheduledFuture[Any]] = {}
        self._subscriptions: dict[str, deque[ScheduledFuture[Any]]] = {}
        self._main: _Task | None = None
        self._cancel_reason: str | None = None
        self._turn = TurnResult()
        self._guid_counter = 0
        self._rng: _random.Random | None = None

    # -- what the context calls --------------------------------------------------------------

    def schedule_activity(
        self, name: str, input_text: str, decode: Callable[[str], Any]
    ) -> ScheduledFuture[Any]:
        """Queue an activity call and return its future."""
        future: ScheduledFuture[Any] = ScheduledFuture(self, "activity", name, decode)
        self._actions.append(_CallActivity(future, name, input_text))
        return future

    def schedule_timer(self, fire_at_ms: int) -> ScheduledFuture[None]:
        """Queue a durable timer firing at ``fire_at_ms``."""
        future: ScheduledFuture[None] = ScheduledFuture(self, "timer", "", lambda _t: None)
        self._actions.append(_CreateTimer(future, fire_at_ms))
        return future

    def subscribe(self, name: str, decode: Callable[[str], Any]) -> ScheduledFuture[Any]:
        """Queue a positional wait for the external event ``name``."""
        future: ScheduledFuture[Any] = ScheduledFuture(self, "event", name, decode)
        self._actions.append(_Subscribe(future, name))
        return future

    def schedule_sub_orchestration(
        self,
        name: str,
        instance_id: str | None,
        input_text: str,
        version: str | None,
        decode: Callable[[str], Any],
    ) -> ScheduledFuture[Any]:
        """Queue a child orchestration start and return the future of its outcome."""
        future: ScheduledFuture[Any] = ScheduledFuture(self, "suborchestration", name, decode)
        self._actions.append(_CallSubOrchestration(future, name, instance_id, input_text, version))
        return future

    def set_custom_status(self, status: str | None) -> None:
        """Queue a custom status update (visible to clients once the turn commits)."""
        self.custom_status = status
        self._actions.append(_SetStatus(status))

    def spawn(self, coro: Coroutine[Any, Any, T]) -> DurableFuture[T]:
        """Run an async block as an engine task; its future resolves with the block's result."""
        task = _Task(self, coro)
        self._tasks[task] = None
        self._ready.append(task)
        return task.future

    def as_future(self, awaitable: Any) -> DurableFuture[Any]:
        """A durable future for a combinator argument: a future itself, or a spawned coroutine."""
        if isinstance(awaitable, DurableFuture):
            return awaitable
        if isinstance(awaitable, Coroutine):
            return self.spawn(awaitable)
        raise NonDurableAwait(
            f"ctx.all()/ctx.any() accept durable calls (ctx.call_activity, ctx.sleep, ctx.wait_for_event, "
            f"ctx.call_sub_orchestration) and coroutines of async helpers; got {type(awaitable).__name__}"
        )

    def all(self, awaitables: Sequence[Any], return_exceptions: bool = False) -> DurableFuture[list[Any]]:
        """Join: resolves with every result in argument order; fails with the first failure."""
        return _AllFuture([self.as_future(a) for a in awaitables], return_exceptions)

    def any(self, awaitables: Sequence[Any]) -> DurableFuture[tuple[int, Any]]:
        """Select: resolves with ``(index, result)`` of the first to finish in history order."""
        return _AnyFuture([self.as_future(a) for a in awaitables])

    @property
    def rng(self) -> _random.Random:
        """A generator seeded by instance and execution, created on first use."""
        if self._rng is None:
            seed = hashlib.sha256(f"{self.instance_id}\x00{self.execution_id}".encode()).digest()
            self._rng = _random.Random(int.from_bytes(seed[:8], "big"))
        return self._rng

    def new_guid(self) -> uuid.UUID:
        """A UUID that is the same on every replay of this step."""
        self._guid_counter += 1
        return uuid.uuid5(
            _GUID_NAMESPACE, f"{self.instance_id}\x00{self.execution_id}\x00{self._guid_counter}"
        )

    # -- driving ------------------------------------------------------------------------------

    def replay(self, events: Sequence[h.Event]) -> None:
        """Rebuild the coroutine's state from stored history (no side effects are produced)."""
        self.replaying = True
        try:
            for event in events:
                if event.event_id != self.last_event_id + 1:
                    raise NondeterminismError(
                        f"history of {self._where()} is corrupt: expected event {self.last_event_id + 1}, "
                        f"found event {event.event_id} ({event.TYPE})"
                    )
                if event.TERMINAL:
                    self.finished = True
                self.last_event_id = event.event_id
                if event.DECISION:
                    self._match(event)
                else:
                    self._apply(event)
        finally:
            self.replaying = False

    def run_turn(self, now_ms: int, messages: Sequence[h.Message]) -> TurnResult:
        """Advance the orchestration with new messages; return what the turn must commit.

        A new execution needs a ``StartOrchestration`` or ``ContinueAsNew`` among the messages.
        Messages for other executions, duplicates and completions nobody waits for any more are
        dropped (and listed in ``TurnResult.dropped``).
        """
        self._turn = turn = TurnResult()
        turn_time = now_ms
        self._flush(turn_time)
        start: h.StartOrchestration | h.ContinueAsNew | None = None
        if not self.started:
            start = next((m for m in messages if isinstance(m, h.StartOrchestration | h.ContinueAsNew)), None)
            if start is None:
                turn.dropped.extend(f"{m.TYPE}: instance has not started" for m in messages)
                return turn
            started = h.OrchestrationStarted(
                event_id=self.last_event_id + 1,
                timestamp_ms=turn_time,
                name=start.name,
                version=start.version if start.version is not None else self.version,
                input=start.input,
                parent=start.parent,
                initial_custom_status=start.initial_custom_status
                if isinstance(start, h.ContinueAsNew)
                else None,
            )
            turn.status = "running"
            self._record_and_apply(started, turn_time)
        for message in messages:
            if message is start:
                continue
            if self.finished:
                turn.dropped.append(f"{message.TYPE}: orchestration already finished")
                continue
            event = self._to_event(message, turn_time)
            if event is not None:
                self._record_and_apply(event, turn_time)
        if not self.finished:
            self._finish_if_done(turn_time)
        return turn

    # -- internals: history ---------------------------------------------------------------------

    def _where(self) -> str:
        return f"orchestration {self.name!r} (instance {self.instance_id!r}, execution {self.execution_id})"

    def _record_and_apply(self, event: h.Event, turn_time: int) -> None:
        self.last_event_id = event.event_id
        self._turn.new_events.append(event)
        self._apply(event)
        self._flush(turn_time)
        self._finish_if_done(turn_time)

    def _flush(self, turn_time: int) -> None:
        """Record every queued action as a new event (live only)."""
        while self._actions:
            action = self._actions.popleft()
            event = action.make(self, self.last_event_id + 1, turn_time)
            self.last_event_id = event.event_id
            self._turn.new_events.append(event)
            action.bind(self, event)
            action.effects(self, event)

    def _match(self, event: h.Event) -> None:
        """Replay: the next queued action must be the one this decision event records."""
        if not self._actions:
            raise NondeterminismError(
                f"{self._where()} no longer matches its history at event {event.event_id}: history records "
                f"{_describe_event(event)}, but the code did not do that there. The code changed while this "
                "instance was running: register the new code as a new orchestration version (or revert it) "
                "so running instances keep the code they started with."
            )
        action = self._actions.popleft()
        if not action.matches(event):
            raise NondeterminismError(
                f"{self._where()} no longer matches its history at event {event.event_id}: the code "
                f"{action.describe()}, but history records {_describe_event(event)} at that step. The code "
                "changed while this instance was running: register the new code as a new orchestration "
                "version (or revert it) so running instances keep the code they started with."
            )
        action.bind(self, event)

    def _apply(self, event: h.Event) -> None:
        """Deliver one non-decision event to the coroutine and run it to quiescence."""
        self.now_ms = event.timestamp_ms
        if isinstance(event, h.OrchestrationStarted):
            self.started = True
            self.version = event.version
            self.parent = event.parent
            self.input = event.input
            if event.initial_custom_status is not None:
                self.custom_status = event.initial_custom_status
            self._main = _Task(self, self._body(self, event.input))
            self._tasks[self._main] = None
            self._ready.append(self._main)
        elif isinstance(event, h.Completion):
            future = self._open.pop(event.source_id, None)
            if future is None:
                raise NondeterminismError(
                    f"history of {self._where()} delivers {event.TYPE} for event {event.source_id}, "
                    "which the code never scheduled or already stopped waiting for (corrupt history or "
                    "changed code)"
                )
            self._deliver(future, event)
        elif isinstance(event, h.EventRaised):
            waiting = self._subscriptions.get(event.name)
            if waiting:
                future = waiting.popleft()
                self._resolve_decoded(future, event.data)
        elif isinstance(event, h.CancelRequested):
            self._cancel_reason = event.reason
        self._run()

    def _deliver(self, future: ScheduledFuture[Any], event: h.Completion) -> None:
        if isinstance(event, h.ActivityCompleted | h.SubOrchestrationCompleted):
            self._resolve_decoded(future, event.result)
        elif isinstance(event, h.TimerFired):
            future._resolve(None)
        elif isinstance(event, h.ActivityFailed):
            future._fail(ActivityFailed(future.name, event.error))
        elif isinstance(event, h.SubOrchestrationFailed):
            future._fail(SubOrchestrationFailed(future.name, future.child_id, event.error))

    @staticmethod
    def _resolve_decoded(future: ScheduledFuture[Any], text: str) -> None:
        try:
            value = future.decode(text)
        except Exception as exc:  # a payload that does not fit the declared type
            future._fail(exc)
        else:
            future._resolve(value)

    def _to_event(self, message: h.Message, ts: int) -> h.Event | None:
        """Turn a live message into the event it adds to history, or None to drop it."""
        next_id = self.last_event_id + 1
        if isinstance(message, h.ExecutionMessage):
            if message.execution_id != self.execution_id:
                self._turn.dropped.append(f"{message.TYPE}: for execution {message.execution_id}")
                return None
            future = self._open.get(message.source_id)
            expected = {
                h.ActivityResult: "activity",
                h.ActivityError: "activity",
                h.TimerElapsed: "timer",
                h.SubOrchestrationResult: "suborchestration",
                h.SubOrchestrationError: "suborchestration",
            }[type(message)]
            if future is None or future.kind != expected:
                self._turn.dropped.append(f"{message.TYPE}: nothing waits for event {message.source_id}")
                return None
            src = message.source_id
            if isinstance(message, h.ActivityResult):
                return h.ActivityCompleted(
                    event_id=next_id, timestamp_ms=ts, source_id=src, result=message.result
                )
            if isinstance(message, h.ActivityError):
                return h.ActivityFailed(event_id=next_id, timestamp_ms=ts, source_id=src, error=message.error)
            if isinstance(message, h.TimerElapsed):
                return h.TimerFired(
                    event_id=next_id, timestamp_ms=ts, source_id=src, fire_at_ms=message.fire_at_ms
                )
            if isinstance(message, h.SubOrchestrationResult):
                return h.SubOrchestrationCompleted(
                    event_id=next_id, timestamp_ms=ts, source_id=src, result=message.result
                )
            assert isinstance(message, h.SubOrchestrationError)
            return h.SubOrchestrationFailed(
                event_id=next_id, timestamp_ms=ts, source_id=src, error=message.error
            )
        if isinstance(message, h.RaiseEvent):
            return h.EventRaised(event_id=next_id, timestamp_ms=ts, name=message.name, data=message.data)
        if isinstance(message, h.CancelInstance):
            if self._cancel_reason is not None:
                return None
            return h.CancelRequested(event_id=next_id, timestamp_ms=ts, reason=message.reason)
        if isinstance(message, h.StartOrchestration | h.ContinueAsNew):
            self._turn.dropped.append(f"{message.TYPE}: instance already started")
            return None
        self._turn.dropped.append(f"{message.TYPE}: not an orchestrator message")
        return None

    # -- internals: tasks ------------------------------------------------------------------------

    def _run(self) -> None:
        """Step ready tasks until none can move."""
        ready = self._ready
        while ready:
            task = ready.popleft()
            if not task.closed:
                self._step(task)

    def _step(self, task: _Task) -> None:
        error: BaseException | None = None
        while True:
            try:
                yielded = task.coro.send(None) if error is None else task.coro.throw(error)
            except StopIteration as stop:
                task.closed = True
                self._tasks.pop(task, None)
                task.future._resolve(stop.value)
                return
            except (Exception, ContinueAsNewSignal) as exc:
                task.closed = True
                self._tasks.pop(task, None)
                task.future._fail(exc)
                return
            if isinstance(yielded, DurableFuture):
                if yielded.done():
                    self._ready.append(task)
                else:
                    task.waiting = yielded
                    yielded._add_callback(functools.partial(self._wake, task))
                return
            error = NonDurableAwait(_non_durable_message(yielded))

    def _wake(self, task: _Task, _future: DurableFuture[Any] | None = None) -> None:
        task.waiting = None
        if not task.closed:
            self._ready.append(task)

    def _cancel_task(self, task: _Task, reason: str) -> None:
        if task.closed:
            return
        task.closed = True
        self._tasks.pop(task, None)
        if task.waiting is not None:
            task.waiting._cancel(reason)
            task.waiting = None
        _close(task.coro)

    def _bind_open(self, future: ScheduledFuture[Any], event_id: int) -> None:
        future.event_id = event_id
        if not future.done():
            self._open[event_id] = future

    def _on_scheduled_cancelled(self, future: ScheduledFuture[Any], reason: str) -> None:
        if future.event_id:
            self._open.pop(future.event_id, None)
            if future.kind == "event":
                waiting = self._subscriptions.get(future.name)
                if waiting and future in waiting:
                    waiting.remove(future)
        if future.kind != "timer":
            self._actions.append(_Cancel(future, reason))

    # -- internals: the end ----------------------------------------------------------------------

    def _finish_if_done(self, turn_time: int) -> None:
        main = self._main
        if self.finished or main is None:
            return
        if self._cancel_reason is None and not main.future.done():
            return
        self.finished = True
        turn = self._turn
        details: h.ErrorDetails | None = None
        output = ""
        terminal: h.Event
        next_input: ContinueAsNewSignal | None = None
        if self._cancel_reason is not None:
            details = h.ErrorDetails("cancelled", "Cancelled", self._cancel_reason)
        elif main.future._error is not None:
            error = main.future._error
            if isinstance(error, ContinueAsNewSignal):
                next_input = error
            else:
                details = _error_details(error)
        else:
            what = f"result of orchestration {self.name!r}"
            try:
                output = check_payload(dumps(main.future._value, what=what), what)
            except (SerializationError, LimitExceeded) as exc:
                details = _error_details(exc)
        self._cancel_outstanding("orchestration ended")
        self._flush(turn_time)
        eid = self.last_event_id + 1
        if next_input is not None:
            terminal = h.OrchestrationContinuedAsNew(
                event_id=eid, timestamp_ms=turn_time, input=next_input.input_text, version=next_input.version
            )
            turn.status, turn.output = "continued_as_new", next_input.input_text
            turn.orchestrator_items.append(
                h.ContinueAsNew(
                    instance_id=self.instance_id,
                    execution_id=self.execution_id + 1,
                    name=self.name,
                    input=next_input.input_text,
                    version=next_input.version or self.version,
                    parent=self.parent,
                    initial_custom_status=self.custom_status,
                )
            )
        elif details is None:
            terminal = h.OrchestrationCompleted(event_id=eid, timestamp_ms=turn_time, output=output)
            turn.status, turn.output = "completed", output
            if self.parent is not None:
                turn.orchestrator_items.append(
                    h.SubOrchestrationResult(
                        instance_id=self.parent.instance_id,
                        execution_id=self.parent.execution_id,
                        source_id=self.parent.source_id,
                        result=output,
                    )
                )
        else:
            if details.kind == "cancelled":
                terminal = h.OrchestrationCancelled(
                    event_id=eid, timestamp_ms=turn_time, reason=details.message
                )
                turn.status = "cancelled"
            else:
                terminal = h.OrchestrationFailed(event_id=eid, timestamp_ms=turn_time, error=details)
                turn.status = "failed"
            turn.output = encode_error(details)
            if self.parent is not None:
                turn.orchestrator_items.append(
                    h.SubOrchestrationError(
                        instance_id=self.parent.instance_id,
                        execution_id=self.parent.execution_id,
                        source_id=self.parent.source_id,
                        error=details,
                    )
                )
        self.last_event_id = eid
        turn.new_events.append(terminal)

    def _cancel_outstanding(self, reason: str) -> None:
        """At the end of an execution: stop every task and cancel all work still in flight."""
        for task in list(self._tasks):
            if not task.closed:
                task.closed = True
                _close(task.coro)
        for future in list(self._open.values()):
            future._cancel(reason)
        for waiting in self._subscriptions.values():
            for future in list(waiting):
                future._cancel(reason)
        self._open.clear()
        self._subscriptions.clear()


def _close(coro: Coroutine[Any, Any, Any]) -> None:
    """Close a cancelled coroutine; one that awaits in a ``finally`` block is just dropped."""
    with contextlib.suppress(RuntimeError):
        coro.close()


def _error_details(error: BaseException) -> h.ErrorDetails:
    if isinstance(error, NondeterminismError):
        kind: h.ErrorKind = "nondeterminism"
    else:
        kind = "application"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return h.ErrorDetails(kind, type(error).__name__, str(error), text)


def error_details(error: BaseException, kind: h.ErrorKind = "application") -> h.ErrorDetails:
    """Capture an exception (type name, message, traceback text) as storable details."""
    details = _error_details(error)
    return h.ErrorDetails(kind, details.type, details.message, details.traceback)


def _non_durable_message(obj: object) -> str:
    module = type(obj).__module__
    if obj is None or module.startswith(("asyncio", "_asyncio", "concurrent")):
        return (
            "an orchestration awaited an asyncio operation, which perdure cannot record or replay. "
            "Use 'await ctx.sleep(seconds)' instead of asyncio.sleep, 'ctx.all([...])' / 'ctx.any([...])' "
            "instead of asyncio.gather / wait / wait_for, and do I/O in an activity (ctx.call_activity)."
        )
    return (
        f"an orchestration awaited {type(obj).__name__} from {module}, which perdure cannot record "
        "or replay. "
        "Orchestrations may only await durable calls (ctx.call_activity, ctx.sleep, ctx.wait_for_event, "
        "ctx.call_sub_orchestration, ctx.all, ctx.any) and async helpers made of them; do I/O in an activity."
    )


__all__ = ["ContinueAsNewSignal", "DurableFuture", "Engine", "ScheduledFuture", "TurnResult", "error_details"]
