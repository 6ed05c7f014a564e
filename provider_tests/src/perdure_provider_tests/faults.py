"""A provider wrapper that injects failures and delays, for reliability tests of runtimes and providers.

::

    faulty = FaultyProvider(SqliteProvider(":memory:"))
    faulty.fail_next_fetch("orchestrator")           # the next orchestrator fetch raises (retryable)
    faulty.fail_next_ack("worker", retryable=False)  # the next work ack raises a permanent error
    faulty.ack_then_fail("orchestrator")             # the next orchestration ack commits, then raises
    faulty.delay_next("ack_orchestration_items", 0.5)
    faulty.drop_connections(times=3)                 # the next 3 calls of any kind fail (retryable)

Faults are queued per operation (a Provider method name) and consumed in order. A *failure*
raises before the call reaches the wrapped provider, so nothing happens. A *fail-after* lets the
call reach the wrapped provider (it commits) and then raises a retryable error, as when a
connection drops between COMMIT and the reply. A *delay* sleeps before the call. Every call is
counted in :attr:`FaultyProvider.calls`, every injected fault in :attr:`FaultyProvider.injected`.

The wrapper declares exactly the wrapped provider's capabilities and hands its ack results
(direct-dispatch leases and locked items included) through unchanged. A fail-after of an ack that
asked for a direct hand-over hides the result like any other: the leases and the instance lock it
granted reach no caller and simply lapse, after which the work is fetched again at a higher
attempt count, exactly as after a real reply lost to a dropped connection. Nothing is released
on the caller's behalf, because a lost reply cannot release anything either.

The same holds for the rest of direct dispatch. A fail-after of an ack with ``keep_lock`` leaves
the instance locked (unless the commit released it because messages were waiting) by a token
whose caller believes the ack failed. That token still holds, so a retry of the same ack is not
refused as a lost lock: it fails permanently on what the commit already applied (its history is
stored, its ``completed_work_items`` are gone). The caller should abandon the token after any
failed ``keep_lock`` ack, as perdure's runtime does; otherwise the lock lapses after ``keep_lock``
seconds and the messages that arrived meanwhile (never tagged) are fetched at attempt 1. A
fail-after of an ack with ``completed_work_items`` has deleted those items: acking their leases
afterwards fails permanently, as for a cancelled activity, and that is right, because the
committed turn already applied their results.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar, get_args

from perdure.history import Event, Message
from perdure.provider import (
    Capabilities,
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

__all__ = ["OPERATIONS", "FaultyProvider", "Operation"]

T = TypeVar("T")

Operation = Literal[
    "fetch_orchestration_items",
    "ack_orchestration_items",
    "abandon_orchestration_item",
    "renew_orchestration_lock",
    "fetch_work_items",
    "ack_work_items",
    "abandon_work_item",
    "renew_work_item_locks",
    "enqueue_orchestrator_messages",
    "read_history",
    "get_instance",
    "get_custom_status",
    "wait_for_work",
    "wait_for_instance_change",
]
#: Every operation a fault can target (the Provider methods, except ``open`` and ``close``).
OPERATIONS: Final[tuple[Operation, ...]] = get_args(Operation)

_FETCH: Final[dict[Queue, Operation]] = {
    "orchestrator": "fetch_orchestration_items",
    "worker": "fetch_work_items",
}
_ACK: Final[dict[Queue, Operation]] = {"orchestrator": "ack_orchestration_items", "worker": "ack_work_items"}


@dataclass
class _Fault:
    operations: frozenset[str]
    kind: Literal["fail", "fail_after", "delay"]
    #: How many more calls it applies to; ``None`` means until :meth:`FaultyProvider.clear`.
    remaining: int | None
    retryable: bool = True
    seconds: float = 0.0
    message: str = ""


def _select(operations: Operation | Iterable[Operation] | None) -> frozenset[str]:
    if operations is None:
        return frozenset(OPERATIONS)
    chosen = frozenset([operations] if isinstance(operations, str) else operations)
    unknown = chosen - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; the operations are {', '.join(OPERATIONS)}")
    return chosen


def _per_queue(table: dict[Queue, Operation], queue: Queue | None) -> list[Operation]:
    return list(table.values()) if queue is None else [table[queue]]


class FaultyProvider(Provider):
    """Wrap ``inner`` and inject failures and delays into its calls; otherwise fully transparent."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name = f"faulty({inner.name})"
        #: How many times each operation was called (faulted or not).
        self.calls: Counter[str] = Counter()
        #: How many faults of each operation fired (failures and fail-afters; delays are not faults).
        self.injected: Counter[str] = Counter()
        self._faults: list[_Fault] = []

    @property
    def capabilities(self) -> Capabilities:
        """The wrapped provider's capabilities."""
        return self.inner.capabilities

    # -- scheduling faults ---------------------------------------------------------------------

    def fail_next(
        self,
        operations: Operation | Iterable[Operation] | None,
        *,
        times: int = 1,
        retryable: bool = True,
        message: str = "injected fault",
    ) -> None:
        """Make the next ``times`` calls of ``operations`` (``None``: any) raise before they happen."""
        self._faults.append(_Fault(_select(operations), "fail", times, retryable=retryable, message=message))

    def fail_after_next(self, operations: Operation | Iterable[Operation] | None, *, times: int = 1) -> None:
        """Let the next ``times`` calls of ``operations`` commit, then raise a retryable error."""
        message = "connection lost after the call committed (injected)"
        self._faults.append(_Fault(_select(operations), "fail_after", times, message=message))

    def delay_next(
        self, operations: Operation | Iterable[Operation] | None, seconds: float, *, times: int | None = 1
    ) -> None:
        """Sleep ``seconds`` before the next ``times`` calls of ``operations`` (``None``: every call)."""
        self._faults.append(_Fault(_select(operations), "delay", times, seconds=seconds))

    def fail_next_fetch(self, queue: Queue | None = None, *, times: int = 1, retryable: bool = True) -> None:
        """Make the next fetch(es) of ``queue`` (``None``: either) raise."""
        self.fail_next(
            _per_queue(_FETCH, queue), times=times, retryable=retryable, message="injected fetch failure"
        )

    def fail_next_ack(self, queue: Queue | None = None, *, times: int = 1, retryable: bool = True) -> None:
        """Make the next ack call(s) of ``queue`` (``None``: either) raise without committing."""
        self.fail_next(
            _per_queue(_ACK, queue), times=times, retryable=retryable, message="injected ack failure"
        )

    def ack_then_fail(self, queue: Queue | None = None, *, times: int = 1) -> None:
        """Let the next ack call(s) of ``queue`` commit, then raise as if the connection dropped.

        Direct hand-overs the acks granted (leases, a locked instance, a lock kept with
        ``keep_lock``) are lost with the reply and lapse on their own; ``completed_work_items`` are
        deleted all the same (see the module docstring).
        """
        self.fail_after_next(_per_queue(_ACK, queue), times=times)

    def drop_connections(self, *, times: int = 3) -> None:
        """Make the next ``times`` calls of any operation fail retryably, as after lost connections."""
        self.fail_next(None, times=times, message="connection dropped (injected)")

    def clear(self) -> None:
        """Forget every pending fault and delay."""
        self._faults.clear()

    @property
    def pending(self) -> int:
        """How many faults and delays are still queued."""
        return len(self._faults)

    # -- the contract, through the faults --------------------------------------------------------

    async def open(self) -> None:
        """Open the wrapped provider."""
        await self.inner.open()

    async def close(self) -> None:
        """Close the wrapped provider."""
        await self.inner.close()

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """See :meth:`Provider.fetch_orchestration_items`."""
        return await self._call(
            "fetch_orchestration_items", lambda: self.inner.fetch_orchestration_items(limit, lock_timeout)
        )

    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """See :meth:`Provider.ack_orchestration_items`."""
        return await self._call("ack_orchestration_items", lambda: self.inner.ack_orchestration_items(acks))

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """See :meth:`Provider.abandon_orchestration_item`."""
        await self._call(
            "abandon_orchestration_item",
            lambda: self.inner.abandon_orchestration_item(
                lock_token, delay=delay, ignore_attempt=ignore_attempt
            ),
        )

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """See :meth:`Provider.renew_orchestration_lock`."""
        await self._call(
            "renew_orchestration_lock", lambda: self.inner.renew_orchestration_lock(lock_token, lock_timeout)
        )

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """See :meth:`Provider.fetch_work_items`."""
        return await self._call("fetch_work_items", lambda: self.inner.fetch_work_items(limit, lock_timeout))

    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """See :meth:`Provider.ack_work_items`."""
        return await self._call("ack_work_items", lambda: self.inner.ack_work_items(acks))

    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """See :meth:`Provider.abandon_work_item`."""
        await self._call(
            "abandon_work_item",
            lambda: self.inner.abandon_work_item(lock_token, delay=delay, ignore_attempt=ignore_attempt),
        )

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """See :meth:`Provider.renew_work_item_locks`."""
        return await self._call(
            "renew_work_item_locks", lambda: self.inner.renew_work_item_locks(lock_tokens, lock_timeout)
        )

    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """See :meth:`Provider.enqueue_orchestrator_messages`."""
        await self._call(
            "enqueue_orchestrator_messages", lambda: self.inner.enqueue_orchestrator_messages(messages)
        )

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """See :meth:`Provider.read_history`."""
        return await self._call("read_history", lambda: self.inner.read_history(instance_id, execution_id))

    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """See :meth:`Provider.get_instance`."""
        return await self._call("get_instance", lambda: self.inner.get_instance(instance_id))

    async def get_custom_status(
        self, instance_id: str, last_seen_version: int
    ) -> tuple[str | None, int] | None:
        """See :meth:`Provider.get_custom_status`."""
        return await self._call(
            "get_custom_status", lambda: self.inner.get_custom_status(instance_id, last_seen_version)
        )

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """See :meth:`Provider.wait_for_work`."""
        await self._call("wait_for_work", lambda: self.inner.wait_for_work(queue, timeout))

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """See :meth:`Provider.wait_for_instance_change`."""
        await self._call(
            "wait_for_instance_change", lambda: self.inner.wait_for_instance_change(instance_id, timeout)
        )

    # -- internals -----------------------------------------------------------------------------

    async def _call(self, operation: Operation, call: Callable[[], Awaitable[T]]) -> T:
        self.calls[operation] += 1
        for delay in self._take(operation, ("delay",), all_matching=True):
            await asyncio.sleep(delay.seconds)
        faults = self._take(operation, ("fail", "fail_after"))
        fault = faults[0] if faults else None
        if fault is not None and fault.kind == "fail":
            self.injected[operation] += 1
            raise ProviderError(operation, fault.message, retryable=fault.retryable)
        result = await call()
        if fault is not None:
            self.injected[operation] += 1
            raise ProviderError(operation, fault.message, retryable=True)
        return result

    def _take(self, operation: str, kinds: tuple[str, ...], *, all_matching: bool = False) -> list[_Fault]:
        """Consume the first (or every) queued fault of ``kinds`` that applies to ``operation``."""
        taken: list[_Fault] = []
        for fault in list(self._faults):
            if fault.kind not in kinds or operation not in fault.operations:
                continue
            taken.append(fault)
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            if not all_matching:
                break
        return taken
