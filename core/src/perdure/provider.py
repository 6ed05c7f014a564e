"""The Provider contract: what a storage backend must do for the runtime and the client.

A provider is storage plus two peek-lock queues, never an orchestration engine: it stores events
and messages as given, never invents event or execution ids, and never decides control flow. The
runtime passes every piece of routing data explicitly (instance ids, visibility times, the
identity of an activity to cancel), so a provider never parses an event's kind.

The invariants below are enforced by the conformance suite (``perdure-provider-tests``); each
sentence of the form "must" is a test there.

Orchestrator queue (messages for instances):
    * A fetch locks an *instance*, not a message: the lock lives apart from the messages and
      tags every message of that instance visible at fetch time. Messages that arrive later are
      not tagged and must survive the ack.
    * Two fetchers never hold the same instance at once; a lock whose lease (``locked_until``)
      has passed may be taken by another fetcher, and the old token is then invalid.
    * Each fetch raises the attempt count of every message it tags; the item reports the
      maximum over its messages. This drives poison handling in the runtime.
    * An ack is one atomic transaction and validates the lock at commit time: append history
      (append-only; a duplicate event id is rejected, nothing is overwritten), create the
      instance if it does not exist (instances are created only here, never by an enqueue, and
      only by an ack that records history: one without history just consumes its messages),
      record the execution, apply status, output and custom status, insert the new worker and
      orchestrator messages, *then* delete the cancelled activities (so scheduling and
      cancelling one activity in the same ack leaves nothing behind), delete the tagged
      messages and release the lock. On any error nothing of it is applied.
    * A message with ``visible_at_ms`` in the future (a durable timer, an abandon delay) is not
      fetched before that time.

Worker queue (activity executions):
    * A fetch leases single items, oldest first, and raises their attempt counts.
    * An ack deletes the item and enqueues its completion in one transaction, only while the
      lease is still held. If the row is gone (cancelled by an orchestration ack) or the lease
      expired, the ack fails permanently: that is how a worker learns its activity was cancelled.
    * A renewal of a lease that is gone or expired fails the same way.

Direct dispatch (optional, ``capabilities.direct_dispatch``):
    The runtime that commits a turn usually runs the activities it schedules, and the runtime
    that runs an activity can usually run the turn its result wakes. Two ack options let each
    hand-over skip a fetch (a round trip, and the scan behind it):

    * An orchestration ack with ``lease_worker_items = n`` inserts its first ``n`` worker items
      already leased to the caller (attempt count 1, lease ``worker_lease_timeout`` seconds from
      the commit) and returns their leases as the ack's result. Leased, they are invisible to
      every fetcher until the lease lapses, exactly like fetched items.
    * A work-item ack with ``lock_instance`` set also locks the instance its completion is for,
      in the same transaction, when no one holds that instance: every visible message of the
      instance (the new completion included) is tagged and counted as a fetch would, and the
      item is the ack's result. When the instance is locked elsewhere the result is ``None`` and
      the completion waits for a fetch like any other message.
    * An orchestration ack with ``keep_lock`` keeps the instance locked, same token, instead of
      releasing it, so the runtime that leased a short activity can run the turn its result
      wakes with no call at all in between; that next ack lists the activity's lease in
      ``completed_work_items`` and deletes the work item it consumed in memory. A message of the
      instance that is visible and untagged at commit time must not wait behind a held lock: the
      lock is then released as usual (and the caller's next ack with that token fails).

Errors:
    Every failure is a :class:`ProviderError` whose ``retryable`` says whether the same call may
    succeed later (busy database, dropped connection) or never will (bad lock token, duplicate
    event id, corrupt data). An undecodable history is reported by :meth:`Provider.read_history`
    as a permanent error; an undecodable queue message is reported on the fetched item, never
    raised while a lock is held.

Batches:
    Fetch and ack take and return several items so that a busy runtime pays one round trip (and
    one durable commit) for many turns. Each ack in a batch stands alone: one that fails is
    reported in its slot of the result and never undoes or blocks the others.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from perdure.history import (
    ActivityExecute,
    ActivityRef,
    ErrorDetails,
    Event,
    Message,
    ParentRef,
)

InstanceStatus = Literal["running", "completed", "failed", "cancelled"]
ExecutionStatus = Literal["running", "completed", "failed", "cancelled", "continued_as_new"]
Queue = Literal["orchestrator", "worker"]

TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class ProviderError(Exception):
    """A provider call failed.

    ``retryable`` is True when the same call may succeed later (database busy or locked, a
    dropped connection, a timeout) and False when it never will (an invalid or expired lock, a
    duplicate event id, corrupt data, bad input).
    """

    def __init__(self, operation: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.message = message
        self.retryable = retryable

    @classmethod
    def lock_lost(cls, operation: str, lock_token: str) -> ProviderError:
        """The lock or lease behind ``lock_token`` is invalid, expired or was never granted."""
        return cls(
            operation, f"lock {lock_token!r} is not held (invalid, expired or released)", retryable=False
        )

    def __repr__(self) -> str:
        kind = "retryable" if self.retryable else "permanent"
        return f"ProviderError({self.operation!r}, {self.message!r}, {kind})"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider supports beyond the required contract.

    The conformance suite skips the tests of a capability a provider does not declare, and says
    so in its report.
    """

    #: ``wait_for_work`` and ``wait_for_instance_change`` return early: at once when work is
    #: already waiting, as soon as new work is enqueued or a delayed message comes due, and when
    #: an ack changes the watched instance (otherwise they simply sleep).
    wakeups: bool = False
    #: Wake-ups also reach other processes sharing the store (e.g. LISTEN/NOTIFY).
    cross_process: bool = False
    #: The store can be shared by several processes at once.
    multi_process: bool = False
    #: Calls made through one provider object take effect in the order they were made: a fetch
    #: issued after an ack (even before the ack returned) sees what the ack committed, as with a
    #: single connection serving calls first come, first served. The runtime then asks for the
    #: work an ack produces right behind the ack, so both share one round trip.
    ordered_calls: bool = False
    #: Acks can hand work straight to the caller: ``OrchestrationAck.lease_worker_items`` and
    #: ``WorkItemAck.lock_instance`` (see "Direct dispatch" in :mod:`perdure.provider`).
    direct_dispatch: bool = False
    #: Largest payload (input, result, event data) the provider accepts, in bytes.
    max_payload_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The stored state of one orchestration instance (its current execution)."""

    instance_id: str
    name: str
    version: str | None
    execution_id: int
    status: ExecutionStatus
    #: JSON text: the result when completed, the input of the next execution when continued,
    #: an encoded :class:`~perdure.history.ErrorDetails` when failed or cancelled.
    output: str | None
    parent_instance_id: str | None
    custom_status: str | None
    custom_status_version: int
    #: The highest event id stored for the current execution (0 before the first ack).
    last_event_id: int
    created_at_ms: int
    updated_at_ms: int


@dataclass(slots=True)
class OrchestrationItem:
    """A locked instance and the messages tagged for it by one fetch."""

    instance_id: str
    lock_token: str
    attempt_count: int
    messages: list[Message]
    #: ``None`` until the first ack of the instance has created it.
    instance: InstanceInfo | None
    #: One line per message that could not be decoded, naming the message and the decode error
    #: (such messages are tagged too and deleted by the ack).
    bad_messages: list[str] = field(default_factory=list)


@dataclass(slots=True)
class OrchestrationAck:
    """Everything one orchestration turn commits, atomically.

    ``name`` and ``parent`` describe the instance so the ack can create it; they are fixed when
    the instance is created, as is its creation time. ``version`` is taken from the first ack of
    each execution (so it may change at continue-as-new). ``status`` and ``output`` are set when
    the turn starts or ends an execution; an ack without a status leaves both unchanged.
    ``custom_status`` is written only when ``custom_status_changed`` is True (``None`` clears it).
    A lock token is valid only for the instance it locked.
    """

    lock_token: str
    instance_id: str
    execution_id: int
    name: str
    version: str | None = None
    parent: ParentRef | None = None
    history: Sequence[Event] = ()
    worker_items: Sequence[ActivityExecute] = ()
    orchestrator_items: Sequence[Message] = ()
    cancelled_activities: Sequence[ActivityRef] = ()
    status: ExecutionStatus | None = None
    output: str | None = None
    custom_status_changed: bool = False
    custom_status: str | None = None
    #: Direct dispatch only: lease the first this-many of ``worker_items`` to the caller as they
    #: are enqueued (none of them may be in ``cancelled_activities``); the ack's result is then
    #: their leases, in ``worker_items`` order, instead of ``None``.
    lease_worker_items: int = 0
    #: Seconds those leases last from the commit.
    worker_lease_timeout: float = 30.0
    #: Direct dispatch only: keep the instance locked with the same token for this many seconds
    #: after the commit instead of releasing it, unless one of its messages is visible and
    #: untagged at commit time (then the lock is released as usual).
    keep_lock: float | None = None
    #: Direct dispatch only: lease tokens of work items whose results this turn applied directly
    #: (they never went through the queue). The ack deletes them, and fails permanently, changing
    #: nothing, unless every one of those leases is held.
    completed_work_items: Sequence[str] = ()


@dataclass(slots=True)
class WorkItemLease:
    """A leased activity execution.

    ``ref`` comes from the provider's routing columns, so it is known even when the stored
    payload could not be decoded (then ``item`` is ``None`` and ``decode_error`` says why).
    """

    lock_token: str
    attempt_count: int
    ref: ActivityRef
    item: ActivityExecute | None
    decode_error: str | None = None


@dataclass(slots=True)
class WorkItemAck:
    """Complete a leased activity: delete it and enqueue ``completion`` (if any) atomically."""

    lock_token: str
    completion: Message | None
    #: Direct dispatch only: also lock the completion's instance for this many seconds if no one
    #: holds it; the ack's result is then the locked :class:`OrchestrationItem` (or ``None`` when
    #: the instance is locked elsewhere).
    lock_instance: float | None = None


#: The result of one orchestration ack: ``None``, the direct leases it asked for, or its error.
OrchestrationAckResult = ProviderError | list[WorkItemLease] | None
#: The result of one work-item ack: ``None``, the instance it locked directly, or its error.
WorkItemAckResult = ProviderError | OrchestrationItem | None


class Provider(abc.ABC):
    """A storage backend for perdure. See the module docstring for the invariants.

    Every method may raise :class:`ProviderError`. All times are in seconds of wall clock
    (``time.time()``) unless a name says ``_ms``.
    """

    #: A short name for logs and reports ("sqlite", "postgres", ...).
    name: str = "unknown"

    @property
    def capabilities(self) -> Capabilities:
        """What this provider supports; see :class:`Capabilities`."""
        return Capabilities()

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and prepare storage (migrations included, unless disabled). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads. Idempotent."""

    async def __aenter__(self) -> Provider:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- orchestrator queue ----------------------------------------------------------------

    @abc.abstractmethod
    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """Lock up to ``limit`` distinct instances that have visible messages, oldest work first.

        "Oldest" means by visible time, then enqueue order.

        Each returned item holds an instance lock valid for ``lock_timeout`` seconds and every
        message of that instance visible now, tagged with the lock token. Returns an empty list
        when no unlocked instance has visible work (never because of a lost race with another
        fetcher while other work is eligible).
        """

    @abc.abstractmethod
    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """Commit each turn atomically; return, per ack and in order, its result or its error.

        The result is ``None``, or with ``lease_worker_items`` the leases of those items. An ack
        whose lock is not held (wrong token, expired, already acked) fails permanently and
        changes nothing. One failing ack never affects the others of the batch.
        """

    @abc.abstractmethod
    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release an instance lock without committing anything.

        With ``delay`` the tagged messages stay invisible for that many seconds. With
        ``ignore_attempt`` the fetch is not counted (attempt counts go back down, never below 0).
        An invalid or expired token raises a permanent error.
        """

    @abc.abstractmethod
    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """Extend a held instance lock to ``lock_timeout`` seconds from now.

        Raises a permanent error if the lock is not held (invalid token, expired, released).
        """

    # -- worker queue ----------------------------------------------------------------------

    @abc.abstractmethod
    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """Lease up to ``limit`` visible, unleased (or lease-expired) activity items, oldest first."""

    @abc.abstractmethod
    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """Delete each leased item and enqueue its completion atomically; return per-ack results.

        The result is ``None``, or with ``lock_instance`` the instance item locked directly (or
        ``None`` if it is locked elsewhere). Fails permanently (in that ack's slot) if the item is
        gone or its lease is not held.
        """

    @abc.abstractmethod
    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release a lease without completing.

        ``delay`` and ``ignore_attempt`` mean what they mean for :meth:`abandon_orchestration_item`.
        An invalid or expired token raises a permanent error.
        """

    @abc.abstractmethod
    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """Extend each held lease to ``lock_timeout`` seconds from now.

        Returns, per token, whether the lease is still held. False means the item was cancelled
        (its row deleted) or the lease expired or was taken: the worker should stop the activity.
        """

    # -- client side -----------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """Append messages to the orchestrator queue, visible at their ``visible_at_ms`` (or now).

        Never creates an instance; messages may arrive before their instance exists.
        """

    @abc.abstractmethod
    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """The history of one execution (the current one by default), ordered by event id.

        Empty if the instance or execution does not exist. Raises a permanent error if a stored
        event cannot be decoded; events are never silently dropped.
        """

    @abc.abstractmethod
    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """The instance's stored state, or ``None`` if it has not been created."""

    async def get_custom_status(
        self, instance_id: str, last_seen_version: int
    ) -> tuple[str | None, int] | None:
        """``(custom_status, version)`` if the version is above ``last_seen_version``, else ``None``.

        ``None`` also for an unknown instance. A new instance has status ``None`` at version 0.
        """
        info = await self.get_instance(instance_id)
        if info is None or info.custom_status_version <= last_seen_version:
            return None
        return info.custom_status, info.custom_status_version

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Wait until work may be available on ``queue``, at most ``timeout`` seconds.

        The default sleeps the whole timeout (plain polling). Providers that declare
        ``capabilities.wakeups`` return as soon as work may have arrived; a spurious early
        return is allowed, a late one costs latency but never correctness.
        """
        await asyncio.sleep(timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """Wait until the instance's status or custom status may have changed, at most ``timeout`` s.

        Used by clients waiting on an orchestration. An ack that only appends history need not
        wake the waiters (a long chain of turns would otherwise wake them at every step). The
        default sleeps the whole timeout.
        """
        await asyncio.sleep(timeout)


def encode_error(error: ErrorDetails) -> str:
    """Encode error details as the JSON text stored in ``InstanceInfo.output``."""
    import json

    return json.dumps(
        {"kind": error.kind, "type": error.type, "message": error.message, "traceback": error.traceback},
        separators=(",", ":"),
    )


def decode_error(text: str) -> ErrorDetails:
    """Inverse of :func:`encode_error`; tolerant of missing fields."""
    import json

    data = json.loads(text)
    return ErrorDetails(
        kind=data.get("kind", "application"),
        type=data.get("type", "Error"),
        message=data.get("message", ""),
        traceback=data.get("traceback"),
    )


__all__ = [
    "TERMINAL_STATUSES",
    "Capabilities",
    "ExecutionStatus",
    "InstanceInfo",
    "InstanceStatus",
    "OrchestrationAck",
    "OrchestrationAckResult",
    "OrchestrationItem",
    "Provider",
    "ProviderError",
    "Queue",
    "WorkItemAck",
    "WorkItemAckResult",
    "WorkItemLease",
    "decode_error",
    "encode_error",
]
