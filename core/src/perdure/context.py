"""What orchestration and activity code receive as their first argument.

:class:`OrchestrationContext` is the whole durable API of an orchestration: every method that
touches the outside world records a step in history, and every value that could differ between
runs (time, ids, randomness) comes from history so replays see the same thing.

:class:`ActivityContext` tells an activity who it is (ids, attempt) and whether it has been
cancelled, and hands it a client for starting other orchestrations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from perdure import history as h
from perdure.engine import ContinueAsNewSignal, DurableFuture, Engine
from perdure.errors import ActivityFailed
from perdure.limits import check_custom_status, check_payload, validate_instance_id, validate_name
from perdure.registry import ActivityDef, OrchestrationDef, Registry, require_definition
from perdure.retry import RetryPolicy
from perdure.serialization import dumps, loads

if TYPE_CHECKING:
    from perdure.client import Client

_log = logging.getLogger("perdure.orchestration")
_FLAG_LOCK = threading.Lock()


class ReplaySafeLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that stays silent while the orchestration replays, so each line is logged once."""

    def __init__(self, logger: logging.Logger, ctx: OrchestrationContext) -> None:
        super().__init__(logger, {"instance_id": ctx.instance_id, "orchestration": ctx.name})
        self._ctx = ctx

    def isEnabledFor(self, level: int) -> bool:
        """Enabled only when not replaying (and the underlying logger allows the level)."""
        return not self._ctx.is_replaying and self.logger.isEnabledFor(level)


def _decoder(tp: Any, what: str) -> Callable[[str], Any]:
    return lambda text: loads(text, tp, what=what)


class OrchestrationContext:
    """The durable API available inside an orchestration.

    Calls such as :meth:`call_activity` schedule work when they are made and return a
    :class:`~perdure.engine.DurableFuture`; ``await`` it for the result. Pass several to
    :meth:`all` or :meth:`any` to run them concurrently.
    """

    def __init__(self, engine: Engine, registry: Registry) -> None:
        self._engine = engine
        self._registry = registry
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that is silent while the orchestration replays (``perdure.orchestration``)."""
        if self._logger is None:
            self._logger = ReplaySafeLogger(_log, self)
        return self._logger

    # -- identity and deterministic values ------------------------------------------------------

    @property
    def instance_id(self) -> str:
        """The id of this instance."""
        return self._engine.instance_id

    @property
    def execution_id(self) -> int:
        """1 for the first execution, +1 after each continue-as-new."""
        return self._engine.execution_id

    @property
    def name(self) -> str:
        """The orchestration's registered name."""
        return self._engine.name

    @property
    def version(self) -> str | None:
        """The orchestration version this instance runs."""
        return self._engine.version

    @property
    def is_replaying(self) -> bool:
        """True while the code is re-running steps already in history."""
        return self._engine.replaying

    @property
    def custom_status(self) -> str | None:
        """The current custom status as JSON text (``None`` if unset)."""
        return self._engine.custom_status

    def utc_now(self) -> datetime:
        """The current time as history records it: the same on every replay of this step."""
        return datetime.fromtimestamp(self._engine.now_ms / 1000, tz=UTC)

    def new_guid(self) -> uuid.UUID:
        """A new UUID that is the same on every replay of this step."""
        return self._engine.new_guid()

    def random(self) -> float:
        """A pseudo-random float in [0, 1) from a generator seeded by instance and execution."""
        return self._engine.rng.random()

    # -- durable calls -------------------------------------------------------------------------

    def call_activity(
        self,
        activity: Callable[..., Any] | str,
        input: Any = None,
        *,
        retry: RetryPolicy | None = None,
        result_type: Any = None,
    ) -> DurableFuture[Any]:
        """Schedule an activity (a registered function or its name) and return its future.

        The result is converted to the activity's return annotation (or ``result_type``). A
        failure arrives as :class:`~perdure.errors.ActivityFailed`. With ``retry`` the call
        is retried per the policy, waiting on durable timers between attempts.
        """
        name, definition = self._activity(activity)
        what = f"input of activity {name!r}"
        text = check_payload(dumps(input, what=what), what)
        tp = result_type if result_type is not None else (definition.output_type if definition else Any)
        decode = _decoder(tp, f"result of activity {name!r}")
        if retry is None:
            return self._engine.schedule_activity(name, text, decode)
        return self._engine.spawn(self._with_retry(name, text, decode, retry))

    async def _with_retry(
        self, name: str, text: str, decode: Callable[[str], Any], policy: RetryPolicy
    ) -> Any:
        engine = self._engine
        attempt = 1
        while True:
            call = engine.schedule_activity(name, text, decode)
            try:
                if policy.timeout is None:
                    return await call
                timer = engine.schedule_timer(engine.now_ms + int(policy.timeout * 1000))
                index, value = await engine.any([call, timer])
                if index == 1:
                    raise ActivityFailed(
                        name,
                        h.ErrorDetails(
                            "timeout",
                            "ActivityTimeout",
                            f"attempt {attempt} took longer than {policy.timeout}s",
                        ),
                    )
                return value
            except ActivityFailed as failure:
                if not policy.should_retry(failure.type_name, attempt):
                    raise
                wait = policy.delay_after(attempt)
                if wait > 0:
                    await engine.schedule_timer(engine.now_ms + int(wait * 1000))
                attempt += 1

    def create_timer(self, when: float | timedelta | datetime) -> DurableFuture[None]:
        """A durable timer: after ``when`` seconds (or a timedelta), or at a datetime."""
        now = self._engine.now_ms
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ValueError("create_timer needs an aware datetime (e.g. with tzinfo=UTC)")
            fire_at = int(when.timestamp() * 1000)
        else:
            seconds = when.total_seconds() if isinstance(when, timedelta) else float(when)
            if seconds < 0:
                raise ValueError(f"a timer cannot fire in the past ({seconds} s)")
            fire_at = now + int(seconds * 1000)
        return self._engine.schedule_timer(max(fire_at, now))

    def sleep(self, seconds: float | timedelta) -> DurableFuture[None]:
        """Wait durably; ``await ctx.sleep(30 * 86400)`` holds no thread and survives restarts."""
        return self.create_timer(seconds)

    def wait_for_event(self, name: str, *, result_type: Any = Any) -> DurableFuture[Any]:
        """Wait for an external event raised with ``client.raise_event(instance, name, data)``.

        Positional: the n-th wait for ``name`` receives the n-th event of that name raised while
        a wait is open; an event raised while nothing waits for it is recorded but not delivered.
        """
        validate_name(name, "event name")
        return self._engine.subscribe(name, _decoder(result_type, f"event {name!r}"))

    def call_sub_orchestration(
        self,
        orchestration: Callable[..., Any] | str,
        input: Any = None,
        *,
        instance_id: str | None = None,
        version: str | None = None,
        result_type: Any = None,
    ) -> DurableFuture[Any]:
        """Start a child orchestration and return the future of its result.

        The child's id defaults to ``"{parent id}:{event id}"`` (deterministic). Its failure or
        cancellation arrives as :class:`~perdure.errors.SubOrchestrationFailed`.
        """
        definition: OrchestrationDef | None
        if isinstance(orchestration, str):
            name, definition = orchestration, self._registry.orchestration_def(orchestration, version)
        else:
            found = require_definition(orchestration, OrchestrationDef)
            name, definition = found.name, found
            version = version if version is not None else found.version
        if instance_id is not None:
            validate_instance_id(instance_id)
        what = f"input of sub-orchestration {name!r}"
        text = check_payload(dumps(input, what=what), what)
        tp = result_type if result_type is not None else (definition.output_type if definition else Any)
        decode = _decoder(tp, f"result of sub-orchestration {name!r}")
        return self._engine.schedule_sub_orchestration(name, instance_id, text, version, decode)

    # -- composition -----------------------------------------------------------------------------

    def all(
        self,
        awaitables: Sequence[DurableFuture[Any] | Coroutine[Any, Any, Any]],
        *,
        return_exceptions: bool = False,
    ) -> DurableFuture[list[Any]]:
        """Wait for all: results in argument order; the first failure (in history order) is raised.

        Accepts durable calls and coroutines of ``async def`` helpers (each runs as its own
        durable task). With ``return_exceptions`` failures are returned in place of results.
        """
        return self._engine.all(awaitables, return_exceptions)

    def any(
        self, awaitables: Sequence[DurableFuture[Any] | Coroutine[Any, Any, Any]]
    ) -> DurableFuture[tuple[int, Any]]:
        """Wait for the first to finish (in history order); returns ``(index, result)``.

        The others are cancelled: their activities are withdrawn (a running one is told to
        stop), child orchestrations are cancelled, waits are dropped. If the first to finish
        failed, its error is raised.
        """
        return self._engine.any(awaitables)

    # -- lifecycle -------------------------------------------------------------------------------

    def continue_as_new(self, input: Any = None, *, version: str | None = None) -> NoReturn:
        """End this execution and start a fresh one with ``input`` and an empty history.

        Does not return. Use it for eternal orchestrations so history stays short.
        """
        what = f"input of orchestration {self.name!r}"
        raise ContinueAsNewSignal(check_payload(dumps(input, what=what), what), version)

    def set_custom_status(self, status: Any) -> None:
        """Publish a small JSON value that clients can read and watch (``None`` clears it)."""
        text = None if status is None else check_custom_status(dumps(status, what="custom status"))
        self._engine.set_custom_status(text)

    # -- helpers ---------------------------------------------------------------------------------

    def _activity(self, activity: Callable[..., Any] | str) -> tuple[str, ActivityDef | None]:
        if isinstance(activity, str):
            return validate_name(activity, "activity name"), self._registry.activity_def(activity)
        found = require_definition(activity, ActivityDef)
        return found.name, found


def orchestration_body(
    definition: OrchestrationDef, registry: Registry
) -> Callable[[Engine, str], Coroutine[Any, Any, Any]]:
    """Build the engine's body function: decode the input, call the user's orchestration."""
    what = f"input of orchestration {definition.name!r}"

    async def run(ctx: OrchestrationContext, input_text: str) -> Any:
        if definition.takes_input:
            return await definition.fn(ctx, loads(input_text, definition.input_type, what=what))
        return await definition.fn(ctx)

    def body(engine: Engine, input_text: str) -> Coroutine[Any, Any, Any]:
        return run(OrchestrationContext(engine, registry), input_text)

    return body


class ActivityContext:
    """Passed to activities: identity, attempt number, cancellation and a client.

    Cancellation is cooperative: when the orchestration stops waiting for this activity (a lost
    race, a cancelled instance) or the worker loses its lease, :meth:`is_cancelled` turns True and
    :meth:`wait_cancelled` returns. The activity decides how to stop.
    """

    def __init__(
        self,
        *,
        instance_id: str,
        execution_id: int,
        activity_id: int,
        name: str,
        attempt: int,
        client: Client,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.instance_id = instance_id
        self.execution_id = execution_id
        self.activity_id = activity_id
        self.name = name
        self.attempt = attempt
        self.client = client
        self._loop = loop
        self._cancelled = False
        # Created on first wait: most activities never wait for cancellation.
        self._flag: threading.Event | None = None
        self._event: asyncio.Event | None = None

    def is_cancelled(self) -> bool:
        """True once the activity should stop (safe to call from a worker thread)."""
        return self._cancelled

    async def wait_cancelled(self) -> None:
        """Return when the activity is cancelled (for async activities)."""
        if self._event is None:
            self._event = asyncio.Event()
            if self._cancelled:
                self._event.set()
        await self._event.wait()

    def wait_cancelled_sync(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds for cancellation (for sync activities); True if cancelled."""
        with _FLAG_LOCK:
            if self._flag is None:
                self._flag = threading.Event()
                if self._cancelled:
                    self._flag.set()
        return self._flag.wait(timeout)

    def _cancel(self) -> None:
        """Signal cancellation (called on the runtime's loop)."""
        if self._cancelled:
            return
        with _FLAG_LOCK:
            self._cancelled = True
            if self._flag is not None:
                self._flag.set()
        if self._event is not None:
            self._event.set()


__all__ = ["ActivityContext", "OrchestrationContext", "ReplaySafeLogger", "orchestration_body"]
