"""The client: start, signal, cancel and observe orchestrations through a provider.

A client talks only to the provider, so any process that can reach the store (a web handler, a
script, an activity) can use one; no runtime needs to run in the same process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from perdure import history as h
from perdure.errors import InstanceAlreadyExists, InstanceNotFound, OrchestrationFailed
from perdure.limits import check_payload, validate_instance_id, validate_name
from perdure.provider import TERMINAL_STATUSES, InstanceInfo, Provider, decode_error
from perdure.registry import OrchestrationDef, Registry, require_definition
from perdure.serialization import dumps, loads

Status = Literal["running", "completed", "failed", "cancelled"]
IfExists = Literal["error", "ignore"]


@dataclass(frozen=True, slots=True)
class OrchestrationStatus:
    """A snapshot of one instance as a client sees it.

    ``status`` is ``running`` (also between two executions of a continue-as-new), ``completed``,
    ``failed`` or ``cancelled``. ``output`` is the result as JSON text when completed; use
    :meth:`result` to decode it. ``error`` explains a failure or cancellation.
    """

    instance_id: str
    name: str
    version: str | None
    status: Status
    execution_id: int
    output: str | None
    error: h.ErrorDetails | None
    custom_status: str | None
    custom_status_version: int
    parent_instance_id: str | None
    created_at: float
    updated_at: float

    @property
    def is_terminal(self) -> bool:
        """True when the instance completed, failed or was cancelled."""
        return self.status in TERMINAL_STATUSES

    def result(self, tp: Any = Any) -> Any:
        """The decoded result (as ``tp``); raises :class:`OrchestrationFailed` if it failed."""
        if self.error is not None:
            raise OrchestrationFailed(self.instance_id, self.error)
        if self.status != "completed" or self.output is None:
            raise RuntimeError(f"orchestration {self.instance_id!r} has not completed (status {self.status})")
        return loads(self.output, tp, what=f"result of orchestration {self.instance_id!r}")

    def custom_status_value(self, tp: Any = Any) -> Any:
        """The decoded custom status (``None`` when unset)."""
        return None if self.custom_status is None else loads(self.custom_status, tp, what="custom status")

    @classmethod
    def from_info(cls, info: InstanceInfo) -> OrchestrationStatus:
        """Translate the provider's stored state into the client's view."""
        status: Status = "running" if info.status == "continued_as_new" else info.status
        error = None
        output = info.output
        if status in ("failed", "cancelled") and output is not None:
            error = decode_error(output)
            output = None
        return cls(
            instance_id=info.instance_id,
            name=info.name,
            version=info.version,
            status=status,
            execution_id=info.execution_id,
            output=output if status == "completed" else None,
            error=error,
            custom_status=info.custom_status,
            custom_status_version=info.custom_status_version,
            parent_instance_id=info.parent_instance_id,
            created_at=info.created_at_ms / 1000,
            updated_at=info.updated_at_ms / 1000,
        )


class Client:
    """Start and observe orchestrations.

    ``registry`` is optional and only documents which code the caller means; decorated functions
    are recognised without it, and string names are passed through unchecked.
    """

    def __init__(self, provider: Provider, registry: Registry | None = None) -> None:
        self.provider = provider
        self.registry = registry

    async def start_orchestration(
        self,
        orchestration: Callable[..., Any] | str,
        input: Any = None,
        *,
        instance_id: str | None = None,
        version: str | None = None,
        if_exists: IfExists = "error",
    ) -> str:
        """Enqueue a new instance and return its id (a random UUID unless given).

        If an instance with that id already exists, ``if_exists="error"`` raises
        :class:`InstanceAlreadyExists` and ``"ignore"`` returns the id without starting anything.
        Two starts racing for the same new id both return; the first to be processed wins and the
        other is dropped by the runtime (never run twice).
        """
        name, pinned = self._orchestration_name(orchestration)
        version = version if version is not None else pinned
        instance = validate_instance_id(instance_id) if instance_id is not None else uuid.uuid4().hex
        # A fresh random id cannot exist yet: only a caller-chosen one needs the look-up.
        existing = await self.provider.get_instance(instance) if instance_id is not None else None
        if existing is not None:
            if if_exists == "ignore":
                return instance
            raise InstanceAlreadyExists(
                f"instance {instance!r} already exists ({existing.name}, {existing.status}); "
                "pick another id, delete the old instance, or pass if_exists='ignore'"
            )
        what = f"input of orchestration {name!r}"
        text = check_payload(dumps(input, what=what), what)
        await self.provider.enqueue_orchestrator_messages(
            [h.StartOrchestration(instance_id=instance, name=name, input=text, version=version)]
        )
        return instance

    async def raise_event(self, instance_id: str, name: str, data: Any = None) -> None:
        """Deliver an external event to ``wait_for_event(name)`` of a running instance."""
        validate_name(name, "event name")
        what = f"data of event {name!r}"
        text = check_payload(dumps(data, what=what), what)
        await self.provider.enqueue_orchestrator_messages(
            [h.RaiseEvent(instance_id=instance_id, name=name, data=text)]
        )

    async def cancel(self, instance_id: str, reason: str = "cancelled by client") -> None:
        """Ask an instance to cancel.

        It ends as ``cancelled``, its children are cancelled and its running activities get the
        cooperative cancel signal.
        """
        await self.provider.enqueue_orchestrator_messages(
            [h.CancelInstance(instance_id=instance_id, reason=reason)]
        )

    async def get_status(self, instance_id: str) -> OrchestrationStatus | None:
        """The instance's current status, or ``None`` if it does not exist (or has not started yet)."""
        info = await self.provider.get_instance(instance_id)
        return None if info is None else OrchestrationStatus.from_info(info)

    async def wait_for_orchestration(
        self, instance_id: str, timeout: float | None = None, *, poll_interval: float = 0.5
    ) -> OrchestrationStatus:
        """Wait until the instance completes, fails or is cancelled; return its final status.

        Raises :class:`TimeoutError` after ``timeout`` seconds (forever when None). The status is
        returned, not raised: call ``status.result()`` to get the value or the failure.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.get_status(instance_id)
            if status is not None and status.is_terminal:
                return status
            wait = poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = "not started" if status is None else status.status
                    raise TimeoutError(f"orchestration {instance_id!r} still {state} after {timeout} s")
                wait = min(wait, remaining)
            await self.provider.wait_for_instance_change(instance_id, wait)

    async def wait_for_status_change(
        self,
        instance_id: str,
        last_seen_version: int = 0,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.5,
    ) -> tuple[Any, int]:
        """Wait until the custom status version exceeds ``last_seen_version``.

        Returns ``(decoded custom status, version)``. Raises :class:`TimeoutError` after
        ``timeout`` seconds, and :class:`InstanceNotFound` if the instance ended without a change.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = await self.provider.get_custom_status(instance_id, last_seen_version)
            if found is not None:
                text, version = found
                return (None if text is None else loads(text, what="custom status")), version
            info = await self.provider.get_instance(instance_id)
            if info is not None and info.status in TERMINAL_STATUSES:
                raise InstanceNotFound(
                    f"orchestration {instance_id!r} ended ({info.status}) without a status change"
                )
            wait = poll_interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"custom status of {instance_id!r} did not change within {timeout} s")
                wait = min(wait, remaining)
            await self.provider.wait_for_instance_change(instance_id, wait)

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[h.Event]:
        """The recorded history of an execution (the current one by default)."""
        return await self.provider.read_history(instance_id, execution_id)

    def _orchestration_name(self, orchestration: Callable[..., Any] | str) -> tuple[str, str | None]:
        """The name, and the version of a decorated function (None for a plain name)."""
        if isinstance(orchestration, str):
            # Not checked against the registry: in a rolling deploy the runtime that knows the
            # name may not be this process's. An unknown name is retried, then failed as poison.
            return validate_name(orchestration, "orchestration name"), None
        found = require_definition(orchestration, OrchestrationDef)
        return found.name, found.version


__all__ = ["Client", "IfExists", "OrchestrationStatus", "Status"]
