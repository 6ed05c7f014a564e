"""An in-memory Provider: the reference implementation of the contract in :mod:`perdure.provider`.

It keeps everything in a few dicts and lists and is meant to be read: each method does what the
contract says, in the order it says it, with no optimisation. It stores events and messages as
JSON text (exactly like a database would), so decode errors, append-only history and payload
round trips behave as they do in a real store.

Leases are on the wall clock (``time.time()``), and wake-ups are real: ``wait_for_work`` returns
as soon as work is enqueued, becomes visible (a due timer, an ended abandon delay) or is freed by
a lapsed lease; ``wait_for_instance_change`` returns as soon as an ack creates the instance or
changes its status or custom status (an ack that only appends history wakes no one).

Direct dispatch is supported: an orchestration ack can lease the activities it schedules to its
caller, and a work-item ack can lock the instance its completion wakes. Both go through the very
code a fetch uses (:meth:`InMemoryProvider._lease` and :meth:`InMemoryProvider._lock_instance`), so
a direct hand-over is indistinguishable from the fetch it replaces. An orchestration ack can also
keep its instance lock (``keep_lock``) unless a message of the instance is already waiting, and
delete work items whose results the turn applied in memory (``completed_work_items``), validating
their leases with the same check a work ack uses (:meth:`InMemoryProvider._leased_row`).

Every method runs to completion without awaiting, so each call is atomic on the event loop: no
locks are needed. The provider is not thread-safe and belongs to the event loop that first waits
on it; it lives as long as the object does (nothing is persisted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from perdure.history import (
    ActivityExecute,
    ActivityRef,
    DecodeError,
    Event,
    Message,
    decode_event,
    decode_message,
    encode_event,
    encode_message,
)
from perdure.provider import (
    Capabilities,
    ExecutionStatus,
    InstanceInfo,
    OrchestrationAck,
    OrchestrationAckResult,
    OrchestrationItem,
    Provider,
    ProviderError,
    Queue,
    WorkItemAck,
    WorkItemAckResult,
    WorkItemLease,
)

__all__ = ["InMemoryProvider"]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass(slots=True)
class _QueuedMessage:
    """One orchestrator-queue row: routing columns plus the opaque encoded message."""

    seq: int
    instance_id: str
    payload: str
    visible_at_ms: int
    attempt_count: int = 0
    #: The token of the fetch that tagged this message, if any.
    lock_token: str | None = None


@dataclass(slots=True)
class _InstanceLock:
    """An instance lock; it lives apart from the messages it tags."""

    token: str
    locked_until: float


@dataclass(slots=True)
class _WorkRow:
    """One worker-queue row: its lease lives on the row itself."""

    seq: int
    ref: ActivityRef
    payload: str
    visible_at_ms: int
    attempt_count: int = 0
    lock_token: str | None = None
    locked_until: float = 0.0


@dataclass(slots=True)
class _Execution:
    name: str
    version: str | None
    status: ExecutionStatus
    output: str | None = None
    #: event id -> encoded event; append-only.
    events: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Instance:
    instance_id: str
    parent_instance_id: str | None
    created_at_ms: int
    updated_at_ms: int
    current_execution_id: int = 0
    custom_status: str | None = None
    custom_status_version: int = 0
    executions: dict[int, _Execution] = field(default_factory=dict)


class _Broadcast:
    """Wake every task waiting now; later waiters wait for the next :meth:`fire`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Return at the next :meth:`fire` or after ``timeout`` seconds, whichever comes first."""
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class InMemoryProvider(Provider):
    """A complete, non-persistent provider for tests, examples and the provider-authoring guide."""

    name = "memory"

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._instances: dict[str, _Instance] = {}
        self._orchestrator_queue: list[_QueuedMessage] = []
        #: instance id -> its lock (an expired lock is as good as none).
        self._instance_locks: dict[str, _InstanceLock] = {}
        self._worker_queue: list[_WorkRow] = []
        self._work_arrived: dict[Queue, _Broadcast] = {"orchestrator": _Broadcast(), "worker": _Broadcast()}
        self._instance_changed = _Broadcast()
        #: instance id -> number of acks that created it or changed its status or custom status,
        #: so waiters can tell their instance changed.
        self._change_counts: dict[str, int] = {}

    @property
    def capabilities(self) -> Capabilities:
        """Wake-ups within this process and direct dispatch; nothing is shared with other processes."""
        return Capabilities(wakeups=True, direct_dispatch=True)

    # -- orchestrator queue ----------------------------------------------------------------

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """Lock the instances whose oldest visible message is oldest, and tag their visible messages."""
        now = time.time()
        now_ms = _ms(now)
        oldest: dict[str, tuple[int, int]] = {}
        for msg in self._orchestrator_queue:
            if msg.visible_at_ms <= now_ms and not self._is_locked(msg.instance_id, now):
                key = (msg.visible_at_ms, msg.seq)
                oldest[msg.instance_id] = min(oldest.get(msg.instance_id, key), key)
        chosen = sorted(oldest, key=oldest.__getitem__)[: max(limit, 0)]
        return [self._lock_instance(instance_id, now, lock_timeout) for instance_id in chosen]

    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """Commit each ack on its own; a failing one leaves no trace and does not affect the others."""
        return [self._ack_orchestration(ack) for ack in acks]

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        op = "ack_orchestration_items"
        now = time.time()
        now_ms = _ms(now)
        lock = self._instance_locks.get(ack.instance_id)
        if lock is None or lock.token != ack.lock_token or lock.locked_until <= now:
            return ProviderError.lock_lost(op, ack.lock_token)

        # Validate and encode everything first: past this block nothing can fail.
        instance = self._instances.get(ack.instance_id)
        execution = instance.executions.get(ack.execution_id) if instance else None
        stored = execution.events if execution else {}
        new_events: dict[int, str] = {}
        try:
            for event in ack.history:
                if event.event_id in stored or event.event_id in new_events:
                    return ProviderError(
                        op,
                        f"duplicate event id {event.event_id} in execution {ack.execution_id} "
                        f"of {ack.instance_id!r}: history is append-only",
                        retryable=False,
                    )
                new_events[event.event_id] = encode_event(event)
            work_rows = [self._new_work_row(item, now_ms) for item in ack.worker_items]
            messages = [self._new_message(msg, now_ms) for msg in ack.orchestrator_items]
        except (TypeError, ValueError) as exc:
            return ProviderError(op, f"cannot encode the ack: {exc}", retryable=False)
        direct = work_rows[: max(ack.lease_worker_items, 0)]
        cancelled = set(ack.cancelled_activities)
        if any(row.ref in cancelled for row in direct):
            return ProviderError(op, "an activity to lease directly is also cancelled", retryable=False)
        # Work items whose results the turn applied in memory: every lease must still be held, as
        # for a work ack; one that is not (cancelled, lapsed, taken, unknown) fails the whole ack.
        completed = set(ack.completed_work_items)
        for token in ack.completed_work_items:
            if self._leased_row(token, now) is None:
                return ProviderError.lock_lost(op, token)

        # Apply: the instance is created here and nowhere else, and only by an ack that records
        # history (one without history just consumes its messages).
        created = instance is None and bool(new_events)
        if instance is None and new_events:
            parent_id = ack.parent.instance_id if ack.parent else None
            instance = _Instance(ack.instance_id, parent_id, created_at_ms=now_ms, updated_at_ms=now_ms)
            self._instances[ack.instance_id] = instance
        if instance is not None:
            if execution is None and new_events:
                execution = _Execution(ack.name, ack.version, status="running")
                instance.executions[ack.execution_id] = execution
                instance.current_execution_id = max(instance.current_execution_id, ack.execution_id)
            if execution is not None:
                execution.events.update(new_events)
                if ack.status is not None:
                    execution.status = ack.status
                    execution.output = ack.output
            if ack.custom_status_changed:
                instance.custom_status = ack.custom_status
                instance.custom_status_version += 1
            instance.updated_at_ms = now_ms

        # Insert new work *before* deleting cancelled activities, so scheduling and cancelling one
        # activity in the same turn leaves nothing behind. Direct leases are taken as a fetch takes
        # them, so the caller holds those items from the moment they exist. The completed items go
        # with the cancelled ones (their leases were checked above).
        self._worker_queue.extend(work_rows)
        leases = [self._lease(row, now, ack.worker_lease_timeout) for row in direct]
        self._orchestrator_queue.extend(messages)
        if cancelled or completed:
            self._worker_queue = [
                row
                for row in self._worker_queue
                if row.ref not in cancelled and row.lock_token not in completed
            ]
        # Only the messages tagged by this fetch: later arrivals are untagged and survive.
        self._orchestrator_queue = [m for m in self._orchestrator_queue if m.lock_token != ack.lock_token]
        # Keep the lock (same token) only while nothing of the instance is waiting: a message that
        # is visible now and untagged (it arrived during the turn, or this ack sent it) must not
        # wait behind a held lock, so the lock is then released as usual. A future message (a
        # timer) does not count: it is not fetchable yet.
        waiting = any(
            m.instance_id == ack.instance_id and m.visible_at_ms <= now_ms for m in self._orchestrator_queue
        )
        if ack.keep_lock is not None and not waiting:
            lock.locked_until = now + ack.keep_lock
        else:
            del self._instance_locks[ack.instance_id]

        # Only what a client waiting on the instance can see wakes it: a history-only turn does not.
        if instance is not None and (created or ack.status is not None or ack.custom_status_changed):
            self._change_counts[ack.instance_id] = self._change_counts.get(ack.instance_id, 0) + 1
            self._instance_changed.fire()
        if len(work_rows) > len(direct):
            self._work_arrived["worker"].fire()
        # New messages, ones that arrived during the lock, or a lock whose end moved (released or
        # kept) while a timer of the instance waits: a waiter may have timed its wait on that lock.
        if messages or any(m.instance_id == ack.instance_id for m in self._orchestrator_queue):
            self._work_arrived["orchestrator"].fire()
        return leases if ack.lease_worker_items > 0 else None

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release the lock; the tagged messages stay (delayed if asked), their fetch optionally uncounted."""
        now = time.time()
        instance_id = self._held_instance(lock_token, now)
        if instance_id is None:
            raise ProviderError.lock_lost("abandon_orchestration_item", lock_token)
        for msg in self._orchestrator_queue:
            if msg.lock_token == lock_token:
                msg.lock_token = None
                if delay > 0:
                    msg.visible_at_ms = _ms(now + delay)
                if ignore_attempt:
                    msg.attempt_count = max(0, msg.attempt_count - 1)
        del self._instance_locks[instance_id]
        self._work_arrived["orchestrator"].fire()

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """Extend a held lock; a lock that is gone or has lapsed cannot be revived."""
        now = time.time()
        instance_id = self._held_instance(lock_token, now)
        if instance_id is None:
            raise ProviderError.lock_lost("renew_orchestration_lock", lock_token)
        self._instance_locks[instance_id].locked_until = now + lock_timeout

    # -- worker queue ----------------------------------------------------------------------

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """Lease the oldest visible items that no live lease holds."""
        now = time.time()
        now_ms = _ms(now)
        leases: list[WorkItemLease] = []
        for row in self._worker_queue:
            if len(leases) >= limit:
                break
            if row.visible_at_ms > now_ms or (row.lock_token is not None and row.locked_until > now):
                continue
            leases.append(self._lease(row, now, lock_timeout))
        return leases

    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """Delete each leased item and enqueue its completion, or report why not."""
        return [self._ack_work(ack) for ack in acks]

    def _ack_work(self, ack: WorkItemAck) -> WorkItemAckResult:
        now = time.time()
        row = self._leased_row(ack.lock_token, now)
        if row is None:  # cancelled (row deleted), lease lapsed or taken, or already acked
            return ProviderError.lock_lost("ack_work_items", ack.lock_token)
        try:
            completion = self._new_message(ack.completion, _ms(now)) if ack.completion else None
        except (TypeError, ValueError) as exc:
            return ProviderError("ack_work_items", f"cannot encode the completion: {exc}", retryable=False)
        self._worker_queue.remove(row)
        if completion is None:
            return None
        self._orchestrator_queue.append(completion)
        # Direct dispatch: take the instance exactly as a fetch would, if no one holds it.
        if ack.lock_instance is not None and not self._is_locked(completion.instance_id, now):
            return self._lock_instance(completion.instance_id, now, ack.lock_instance)
        self._work_arrived["orchestrator"].fire()
        return None

    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release a lease without completing; see :meth:`abandon_orchestration_item`."""
        now = time.time()
        row = self._leased_row(lock_token, now)
        if row is None:
            raise ProviderError.lock_lost("abandon_work_item", lock_token)
        row.lock_token = None
        row.locked_until = 0.0
        if delay > 0:
            row.visible_at_ms = _ms(now + delay)
        if ignore_attempt:
            row.attempt_count = max(0, row.attempt_count - 1)
        self._work_arrived["worker"].fire()

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """Extend each lease still held; False for the ones that are gone or have lapsed."""
        now = time.time()
        held: list[bool] = []
        for token in lock_tokens:
            row = self._leased_row(token, now)
            if row is not None:
                row.locked_until = now + lock_timeout
            held.append(row is not None)
        return held

    # -- client side -----------------------------------------------------------------------

    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """Append the messages; an instance that does not exist yet is not created."""
        now_ms = _ms(time.time())
        try:
            rows = [self._new_message(msg, now_ms) for msg in messages]
        except (TypeError, ValueError) as exc:
            raise ProviderError("enqueue_orchestrator_messages", str(exc), retryable=False) from exc
        self._orchestrator_queue.extend(rows)
        self._work_arrived["orchestrator"].fire()

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """Decode the stored events in event-id order; a corrupt one fails the whole read."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return []
        if execution_id is None:
            execution_id = instance.current_execution_id
        execution = instance.executions.get(execution_id)
        if execution is None:
            return []
        try:
            return [decode_event(execution.events[event_id]) for event_id in sorted(execution.events)]
        except DecodeError as exc:
            raise ProviderError("read_history", f"{instance_id!r}: {exc}", retryable=False) from exc

    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """Return the instance and its current execution, or ``None`` before its first ack."""
        return self._info(instance_id)

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Return when work is fetchable now, at the next enqueue, or when work becomes due."""
        now = time.time()
        due = self._next_work_at(queue, now)
        if due is not None:
            timeout = min(timeout, due - now)
        await self._work_arrived[queue].wait(timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """Return once an ack creates the instance or changes its status or custom status, or at timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = self._change_counts.get(instance_id, 0)
        while self._change_counts.get(instance_id, 0) == seen:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await self._instance_changed.wait(remaining)

    # -- test hooks (used by the conformance suite's factory for this provider) -------------

    def corrupt_history(self, instance_id: str) -> None:
        """Overwrite every stored event of the current execution with undecodable text."""
        instance = self._instances[instance_id]
        events = instance.executions[instance.current_execution_id].events
        for event_id in events:
            events[event_id] = "NOT JSON {{{"

    def corrupt_queued_messages(self, instance_id: str) -> None:
        """Overwrite every queued message routed to the instance (both queues) with undecodable text."""
        for msg in self._orchestrator_queue:
            if msg.instance_id == instance_id:
                msg.payload = "NOT JSON {{{"
        for row in self._worker_queue:
            if row.ref.instance_id == instance_id:
                row.payload = "NOT JSON {{{"

    def stored_attempt_count(self, instance_id: str) -> int:
        """Return the highest attempt count stored among the instance's queued messages (both queues)."""
        counts = [m.attempt_count for m in self._orchestrator_queue if m.instance_id == instance_id]
        counts += [r.attempt_count for r in self._worker_queue if r.ref.instance_id == instance_id]
        return max(counts, default=0)

    # -- internals -------------------------------------------------------------------------

    def _lock_instance(self, instance_id: str, now: float, lock_timeout: float) -> OrchestrationItem:
        """Lock an instance that no one holds and tag its visible messages: a fetch, or a direct lock."""
        now_ms = _ms(now)
        token = f"orch-{uuid.uuid4().hex}"
        self._instance_locks[instance_id] = _InstanceLock(token, now + lock_timeout)
        messages: list[Message] = []
        bad: list[str] = []
        attempt = 0
        for msg in self._orchestrator_queue:
            if msg.instance_id != instance_id or msg.visible_at_ms > now_ms:
                continue
            msg.lock_token = token  # re-tags messages of an expired lock too
            msg.attempt_count += 1
            attempt = max(attempt, msg.attempt_count)
            try:
                decoded = decode_message(msg.payload)
                if not isinstance(decoded, Message):
                    raise DecodeError(f"{decoded.TYPE} does not belong on the orchestrator queue")
                messages.append(decoded)
            except DecodeError as exc:
                bad.append(f"message #{msg.seq}: {exc}")
        return OrchestrationItem(instance_id, token, attempt, messages, self._info(instance_id), bad)

    def _lease(self, row: _WorkRow, now: float, lock_timeout: float) -> WorkItemLease:
        """Lease a worker row that no live lease holds: a fetch, or a direct lease at insertion."""
        row.lock_token = f"work-{uuid.uuid4().hex}"
        row.locked_until = now + lock_timeout
        row.attempt_count += 1
        try:
            item = decode_message(row.payload)
            if not isinstance(item, ActivityExecute):
                raise DecodeError(f"{item.TYPE} does not belong on the worker queue")
            return WorkItemLease(row.lock_token, row.attempt_count, row.ref, item)
        except DecodeError as exc:
            return WorkItemLease(row.lock_token, row.attempt_count, row.ref, None, str(exc))

    def _is_locked(self, instance_id: str, now: float) -> bool:
        lock = self._instance_locks.get(instance_id)
        return lock is not None and lock.locked_until > now

    def _held_instance(self, lock_token: str, now: float) -> str | None:
        """Find the instance whose live lock has this token."""
        for instance_id, lock in self._instance_locks.items():
            if lock.token == lock_token and lock.locked_until > now:
                return instance_id
        return None

    def _leased_row(self, lock_token: str, now: float) -> _WorkRow | None:
        """Find the worker row whose live lease has this token."""
        for row in self._worker_queue:
            if row.lock_token == lock_token and row.locked_until > now:
                return row
        return None

    def _new_message(self, message: Message, now_ms: int) -> _QueuedMessage:
        visible_at = message.visible_at_ms
        visible_at_ms = now_ms if visible_at is None else visible_at
        return _QueuedMessage(next(self._seq), message.instance_id, encode_message(message), visible_at_ms)

    def _new_work_row(self, item: ActivityExecute, now_ms: int) -> _WorkRow:
        ref = ActivityRef(item.instance_id, item.execution_id, item.activity_id)
        return _WorkRow(next(self._seq), ref, encode_message(item), now_ms)

    def _next_work_at(self, queue: Queue, now: float) -> float | None:
        """When the earliest queued work becomes fetchable (visible and unlocked); None if none is queued."""
        times: list[float] = []
        if queue == "orchestrator":
            for msg in self._orchestrator_queue:
                lock = self._instance_locks.get(msg.instance_id)
                times.append(max(msg.visible_at_ms / 1000, lock.locked_until if lock else 0.0))
        else:
            for row in self._worker_queue:
                times.append(max(row.visible_at_ms / 1000, row.locked_until if row.lock_token else 0.0))
        return min(times, default=None)

    def _info(self, instance_id: str) -> InstanceInfo | None:
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        execution = instance.executions[instance.current_execution_id]
        return InstanceInfo(
            instance_id=instance_id,
            name=execution.name,
            version=execution.version,
            execution_id=instance.current_execution_id,
            status=execution.status,
            output=execution.output,
            parent_instance_id=instance.parent_instance_id,
            custom_status=instance.custom_status,
            custom_status_version=instance.custom_status_version,
            last_event_id=max(execution.events, default=0),
            created_at_ms=instance.created_at_ms,
            updated_at_ms=instance.updated_at_ms,
        )
