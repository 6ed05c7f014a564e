"""Exceptions a user of perdure sees, in orchestrations and from the client."""

from __future__ import annotations

from perdure.history import ErrorDetails


class PerdureError(Exception):
    """Base of every perdure exception."""


class DurableTaskFailed(PerdureError):
    """A durable call (activity, sub-orchestration) failed; ``details`` says how.

    The original exception cannot cross a process boundary, so its type name, message and
    traceback text travel as :class:`~perdure.history.ErrorDetails`.
    """

    def __init__(self, what: str, details: ErrorDetails) -> None:
        super().__init__(f"{what} failed: {details.type}: {details.message}")
        self.details = details

    @property
    def type_name(self) -> str:
        """The name of the original exception type (e.g. ``"ValueError"``)."""
        return self.details.type

    @property
    def message(self) -> str:
        """The original exception's message."""
        return self.details.message

    @property
    def traceback(self) -> str | None:
        """The original traceback as text, when one was captured."""
        return self.details.traceback


class ActivityFailed(DurableTaskFailed):
    """An activity raised (or timed out, or was poisoned); catch it in the orchestration."""

    def __init__(self, name: str, details: ErrorDetails) -> None:
        super().__init__(f"activity {name!r}", details)
        self.activity = name


class SubOrchestrationFailed(DurableTaskFailed):
    """A child orchestration failed or was cancelled."""

    def __init__(self, name: str, instance_id: str, details: ErrorDetails) -> None:
        super().__init__(f"sub-orchestration {name!r} ({instance_id})", details)
        self.orchestration = name
        self.instance_id = instance_id


class TaskCancelled(PerdureError):
    """Raised when awaiting a durable future that was cancelled (a lost race, a cancelled block)."""


class NondeterminismError(PerdureError):
    """The orchestration code did something different from what its history records.

    Raised by the replay engine; the instance fails with kind ``nondeterminism``. The message
    names the orchestration, the step, what the code did and what history says.
    """


class NonDurableAwait(PerdureError, TypeError):
    """Orchestration code awaited something perdure cannot record (asyncio, I/O, ...)."""


class OrchestrationFailed(PerdureError):
    """Raised by the client when the orchestration it waited for failed or was cancelled."""

    def __init__(self, instance_id: str, details: ErrorDetails) -> None:
        super().__init__(f"orchestration {instance_id!r} {details.kind}: {details.type}: {details.message}")
        self.instance_id = instance_id
        self.details = details


class InstanceAlreadyExists(PerdureError):
    """``start_orchestration`` was asked to create an instance id that is already taken."""


class InstanceNotFound(PerdureError, LookupError):
    """The client was asked about an instance that does not exist."""


class UnknownName(PerdureError, LookupError):
    """An orchestration or activity name is not registered."""


__all__ = [
    "ActivityFailed",
    "DurableTaskFailed",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "NonDurableAwait",
    "NondeterminismError",
    "OrchestrationFailed",
    "PerdureError",
    "SubOrchestrationFailed",
    "TaskCancelled",
    "UnknownName",
]
