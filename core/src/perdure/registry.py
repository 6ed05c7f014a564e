"""The registry: which orchestrations and activities a runtime can run, by name.

Decorating a function registers it under its own name (or an explicit one) and reads its input
and output types from its annotations, so payloads are converted to and from the declared types
(dataclasses, enums, datetimes, pydantic models, plain JSON).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from perdure.errors import UnknownName
from perdure.limits import validate_name

F = TypeVar("F", bound=Callable[..., Any])

_ATTR = "__perdure__"
_CONTEXT_NAMES = {"ctx", "context"}


@dataclass(frozen=True, slots=True)
class ActivityDef:
    """A registered activity: its name, function and how to call it."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    takes_context: bool
    takes_input: bool
    input_type: Any
    output_type: Any


@dataclass(frozen=True, slots=True)
class OrchestrationDef:
    """A registered orchestration: its name, optional version and coroutine function."""

    name: str
    version: str | None
    fn: Callable[..., Any]
    takes_input: bool
    input_type: Any
    output_type: Any


def _signature(fn: Callable[..., Any], kind: str) -> tuple[bool, bool, Any, Any]:
    """Return (takes_context, takes_input, input_type, output_type) for a decorated function."""
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to plain JSON
        hints = {}
    if len(params) > 2:
        raise TypeError(
            f"{kind} {fn.__qualname__} takes {len(params)} required parameters; it must take the context "
            "and at most one input (group several values in a dataclass or a dict)"
        )

    def is_context(p: inspect.Parameter) -> bool:
        hint = hints.get(p.name)
        hint_name = getattr(hint, "__name__", "")
        return p.name in _CONTEXT_NAMES or hint_name in ("ActivityContext", "OrchestrationContext")

    takes_context = bool(params) and (len(params) == 2 or is_context(params[0]))
    inputs = params[1:] if takes_context else params
    input_type = hints.get(inputs[0].name, Any) if inputs else Any
    return takes_context, bool(inputs), input_type, hints.get("return", Any)


class Registry:
    """Orchestrations and activities by name; use its methods as decorators.

    ``@app.activity`` and ``@app.orchestration`` return the function unchanged, so it can still
    be called directly in unit tests, and remember its registration so that
    ``ctx.call_activity(charge_card, order)`` needs no string name.
    """

    def __init__(self) -> None:
        self._activities: dict[str, ActivityDef] = {}
        self._orchestrations: dict[str, dict[str | None, OrchestrationDef]] = {}
        self._latest: dict[str, OrchestrationDef] = {}

    @overload
    def activity(self, fn: F, /) -> F: ...
    @overload
    def activity(self, *, name: str | None = None) -> Callable[[F], F]: ...

    def activity(self, fn: Any = None, *, name: str | None = None) -> Any:
        """Register a sync or async function as an activity (named after it unless ``name``)."""

        def register(f: F) -> F:
            activity_name = validate_name(name or f.__name__, "activity name")
            if activity_name in self._activities and self._activities[activity_name].fn is not f:
                raise ValueError(f"an activity named {activity_name!r} is already registered")
            takes_context, takes_input, input_type, output_type = _signature(f, "activity")
            definition = ActivityDef(
                name=activity_name,
                fn=f,
                is_async=inspect.iscoroutinefunction(f),
                takes_context=takes_context,
                takes_input=takes_input,
                input_type=input_type,
                output_type=output_type,
            )
            self._activities[activity_name] = definition
            setattr(f, _ATTR, definition)
            return f

        return register(fn) if fn is not None else register

    @overload
    def orchestration(self, fn: F, /) -> F: ...
    @overload
    def orchestration(self, *, name: str | None = None, version: str | None = None) -> Callable[[F], F]: ...

    def orchestration(self, fn: Any = None, *, name: str | None = None, version: str | None = None) -> Any:
        """Register an ``async def`` orchestration (named after it unless ``name``).

        Several versions of one name may be registered; new instances start on the latest
        registered, running instances stay on the version they started with.
        """

        def register(f: F) -> F:
            if not inspect.iscoroutinefunction(f):
                raise TypeError(
                    f"orchestration {f.__qualname__} must be an 'async def' function: perdure drives "
                    "it step by step and records every await"
                )
            orch_name = validate_name(name or f.__name__, "orchestration name")
            versions = self._orchestrations.setdefault(orch_name, {})
            if version in versions and versions[version].fn is not f:
                raise ValueError(f"orchestration {orch_name!r} version {version!r} is already registered")
            takes_context, takes_input, input_type, output_type = _signature(f, "orchestration")
            if not takes_context:
                raise TypeError(
                    f"orchestration {f.__qualname__} must take the OrchestrationContext as its first "
                    "parameter"
                )
            definition = OrchestrationDef(
                name=orch_name,
                version=version,
                fn=f,
                takes_input=takes_input,
                input_type=input_type,
                output_type=output_type,
            )
            versions[version] = definition
            self._latest[orch_name] = definition
            setattr(f, _ATTR, definition)
            return f

        return register(fn) if fn is not None else register

    # -- lookups ---------------------------------------------------------------------------

    def activity_def(self, name: str) -> ActivityDef | None:
        """The activity registered under ``name``, or ``None``."""
        return self._activities.get(name)

    def orchestration_def(
        self, name: str, version: str | None = None, *, exact: bool = False
    ) -> OrchestrationDef | None:
        """The orchestration ``name`` at ``version``.

        With ``version=None`` this is the latest registered version, unless ``exact`` asks for
        the registration that has no version (what an instance pinned to "no version" runs).
        """
        if version is None and not exact:
            return self._latest.get(name)
        return self._orchestrations.get(name, {}).get(version)

    def require_orchestration(self, name: str, version: str | None = None) -> OrchestrationDef:
        """Like :meth:`orchestration_def`, raising :class:`UnknownName` with the known names."""
        found = self.orchestration_def(name, version)
        if found is None:
            known = ", ".join(sorted(self._latest)) or "none"
            which = f"{name!r}" + (f" version {version!r}" if version else "")
            raise UnknownName(f"no orchestration {which} is registered (registered: {known})")
        return found

    @property
    def activity_names(self) -> list[str]:
        """Registered activity names, sorted."""
        return sorted(self._activities)

    @property
    def orchestration_names(self) -> list[str]:
        """Registered orchestration names, sorted."""
        return sorted(self._latest)


def definition_of(fn: object) -> ActivityDef | OrchestrationDef | None:
    """The registration attached to a decorated function, if any."""
    found = getattr(fn, _ATTR, None)
    return found if isinstance(found, ActivityDef | OrchestrationDef) else None


D = TypeVar("D", ActivityDef, OrchestrationDef)


def require_definition(fn: object, kind: type[D]) -> D:
    """The registration of a function passed where an activity or orchestration is expected.

    Raises :class:`TypeError` saying how to register it (or to pass its name instead).
    """
    found = definition_of(fn)
    if not isinstance(found, kind):
        what = "activity" if kind is ActivityDef else "orchestration"
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is not a registered {what}; decorate it with "
            f"@registry.{what} or pass its name as a string"
        )
    return found


__all__ = ["ActivityDef", "OrchestrationDef", "Registry", "definition_of", "require_definition"]
