"""Deliberately broken providers: each breaks exactly one rule of the contract, the way a real
implementation plausibly would, so the suite's own tests can prove the suite catches it.

Each is a small subclass of InMemoryProvider; :data:`CATCHES` names the suite tests that must fail
against it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from perdure.history import ContinueAsNew, Message, StartOrchestration, decode_message, encode_event
from perdure.provider import (
    Capabilities,
    OrchestrationAck,
    OrchestrationAckResult,
    OrchestrationItem,
    ProviderError,
    Queue,
    WorkItemAck,
    WorkItemAckResult,
    WorkItemLease,
)
from perdure.testing import InMemoryProvider as InMemoryProvider  # re-exported for the pytester conftest
from perdure.testing.memory import (
    _Broadcast,
    _Execution,
    _Instance,
    _InstanceLock,
    _QueuedMessage,
    _WorkRow,
)


class DeletesUntaggedMessages(InMemoryProvider):
    """Its ack deletes every message of the instance (``WHERE instance_id = ?``), not the tagged ones."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        before = [m for m in self._orchestrator_queue if m.instance_id == ack.instance_id]
        result = super()._ack_orchestration(ack)
        if not isinstance(result, ProviderError):
            self._orchestrator_queue = [m for m in self._orchestrator_queue if m not in before]
        return result


class SkipsLockValidation(InMemoryProvider):
    """It never validates lock tokens or leases at commit: any ack of any instance goes through."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        self._instance_locks[ack.instance_id] = _InstanceLock(ack.lock_token, time.time() + 60)
        return super()._ack_orchestration(ack)

    def _leased_row(self, lock_token: str, now: float) -> _WorkRow | None:
        return next((row for row in self._worker_queue if row.lock_token == lock_token), None)

    def _held_instance(self, lock_token: str, now: float) -> str | None:
        return next((i for i, lock in self._instance_locks.items() if lock.token == lock_token), None)


class LocksTwice(InMemoryProvider):
    """It lets a second fetcher lock an instance that is already locked."""

    def _is_locked(self, instance_id: str, now: float) -> bool:
        return False


class CancelsBeforeInserting(InMemoryProvider):
    """Its ack deletes cancelled activities before inserting the new ones, so a same-turn cancel misses."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        cancelled = set(ack.cancelled_activities)
        self._worker_queue = [row for row in self._worker_queue if row.ref not in cancelled]
        return super()._ack_orchestration(dataclasses.replace(ack, cancelled_activities=()))


class CreatesOnEnqueue(InMemoryProvider):
    """Queueing a StartOrchestration (by a client or in an ack) creates its instance: an upsert on enqueue."""

    def _new_message(self, message: Message, now_ms: int) -> _QueuedMessage:
        if isinstance(message, StartOrchestration) and message.instance_id not in self._instances:
            instance = _Instance(message.instance_id, None, created_at_ms=now_ms, updated_at_ms=now_ms)
            instance.executions[1] = _Execution(message.name, message.version, status="running")
            instance.current_execution_id = 1
            self._instances[message.instance_id] = instance
        return super()._new_message(message, now_ms)


class AppliesHistoryBeforeValidating(InMemoryProvider):
    """Its ack writes history event by event: a duplicate id fails the ack half-way through."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        lock = self._instance_locks.get(ack.instance_id)
        instance = self._instances.get(ack.instance_id)
        if lock is not None and lock.token == ack.lock_token and instance is not None:
            execution = instance.executions.get(ack.execution_id)
            if execution is not None:
                for event in ack.history:
                    if event.event_id in execution.events:
                        break
                    execution.events[event.event_id] = encode_event(event)
                ack = dataclasses.replace(
                    ack, history=[e for e in ack.history if e.event_id in execution.events]
                )
        return super()._ack_orchestration(ack)


class OverwritesHistory(InMemoryProvider):
    """Its ack upserts events: a duplicate event id silently replaces the stored event."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        instance = self._instances.get(ack.instance_id)
        execution = instance.executions.get(ack.execution_id) if instance else None
        lock = self._instance_locks.get(ack.instance_id)
        if execution is not None and lock is not None and lock.token == ack.lock_token:
            for event in ack.history:
                execution.events.pop(event.event_id, None)
        unique = {event.event_id: event for event in ack.history}
        return super()._ack_orchestration(dataclasses.replace(ack, history=list(unique.values())))


class DecrementsUntaggedAttempts(InMemoryProvider):
    """``ignore_attempt`` decrements every message of the instance, unclamped, not only the fetch's."""

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        instance_id = self._held_instance(lock_token, time.time())
        if ignore_attempt and instance_id is not None:
            for msg in self._orchestrator_queue:
                if msg.instance_id == instance_id:
                    msg.attempt_count -= 1
        await super().abandon_orchestration_item(lock_token, delay=delay, ignore_attempt=False)


class ClaimsWakeupsButPolls(InMemoryProvider):
    """It declares ``wakeups`` but its waits simply sleep the whole timeout."""

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        await asyncio.sleep(timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        await asyncio.sleep(timeout)


class DropsOrphanMessages(InMemoryProvider):
    """Its fetch drops messages for instances that do not exist yet (other than starts)."""

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        def orphan(payload: str, instance_id: str) -> bool:
            starts = isinstance(decode_message(payload), StartOrchestration | ContinueAsNew)
            return instance_id not in self._instances and not starts

        self._orchestrator_queue = [
            m for m in self._orchestrator_queue if not orphan(m.payload, m.instance_id)
        ]
        return await super().fetch_orchestration_items(limit, lock_timeout)


class IgnoresVisibility(InMemoryProvider):
    """Its fetches ignore ``visible_at_ms``: timers fire at once and abandon delays do nothing."""

    def _show_everything(self) -> None:
        now_ms = int(time.time() * 1000)
        for msg in self._orchestrator_queue:
            msg.visible_at_ms = min(msg.visible_at_ms, now_ms)
        for row in self._worker_queue:
            row.visible_at_ms = min(row.visible_at_ms, now_ms)

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        self._show_everything()
        return await super().fetch_orchestration_items(limit, lock_timeout)

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        self._show_everything()
        return await super().fetch_work_items(limit, lock_timeout)


class LeasesNeverLapse(InMemoryProvider):
    """It stretches every lock and lease to an hour: a crashed worker's work is stuck."""

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        return await super().fetch_orchestration_items(limit, max(lock_timeout, 3600.0))

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        return await super().fetch_work_items(limit, max(lock_timeout, 3600.0))


class EnqueuesCompletionOfCancelledWork(InMemoryProvider):
    """Its work ack enqueues the completion even when the leased row is gone (not one transaction)."""

    def _ack_work(self, ack: WorkItemAck) -> WorkItemAckResult:
        result = super()._ack_work(ack)
        if isinstance(result, ProviderError) and ack.completion is not None:
            self._orchestrator_queue.append(self._new_message(ack.completion, int(time.time() * 1000)))
        return result


class LeasesDirectItemsUnleased(InMemoryProvider):
    """It declares direct dispatch but inserts the "leased" items unleased: any fetcher can take them."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        result = super()._ack_orchestration(ack)
        if isinstance(result, list):
            tokens = {lease.lock_token for lease in result}
            for row in self._worker_queue:
                if row.lock_token in tokens:
                    row.lock_token, row.locked_until, row.attempt_count = None, 0.0, 0
        return result


class LeasesDirectItemsOnFailedAcks(InMemoryProvider):
    """It takes direct leases before validating the ack: a failed ack still enqueues its items, leased."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        result = super()._ack_orchestration(ack)
        if isinstance(result, ProviderError) and ack.lease_worker_items > 0:
            now = time.time()
            for item in ack.worker_items[: ack.lease_worker_items]:
                row = self._new_work_row(item, int(now * 1000))
                self._worker_queue.append(row)
                self._lease(row, now, ack.worker_lease_timeout)
        return result


class DirectLockIgnoresExistingLock(InMemoryProvider):
    """Its direct lock overwrites whatever lock the completion's instance has (an upsert of the lock row)."""

    def _ack_work(self, ack: WorkItemAck) -> WorkItemAckResult:
        leased = self._leased_row(ack.lock_token, time.time()) is not None
        if leased and ack.lock_instance is not None and ack.completion is not None:
            self._instance_locks.pop(ack.completion.instance_id, None)
        return super()._ack_work(ack)


class DirectLockTakesOnlyTheCompletion(InMemoryProvider):
    """Its direct lock tags only the completion it enqueued, not the instance's other visible messages."""

    def _ack_work(self, ack: WorkItemAck) -> WorkItemAckResult:
        result = super()._ack_work(ack)
        if isinstance(result, OrchestrationItem) and ack.completion is not None:
            for msg in self._orchestrator_queue:
                if msg.lock_token == result.lock_token and decode_message(msg.payload) != ack.completion:
                    msg.lock_token = None
                    msg.attempt_count -= 1
            result.messages = [ack.completion]
            result.attempt_count = 1
        return result


class DirectLockOnLostLease(InMemoryProvider):
    """Its work ack takes the direct lock before checking the lease, and keeps it when the ack fails."""

    def _ack_work(self, ack: WorkItemAck) -> WorkItemAckResult:
        result = super()._ack_work(ack)
        if isinstance(result, ProviderError) and ack.lock_instance is not None and ack.completion:
            now = time.time()
            if not self._is_locked(ack.completion.instance_id, now):
                self._lock_instance(ack.completion.instance_id, now, ack.lock_instance)
        return result


class ReleasesKeptLocks(InMemoryProvider):
    """It declares direct dispatch but ignores ``keep_lock``: every ack releases the instance."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        return super()._ack_orchestration(dataclasses.replace(ack, keep_lock=None))


class KeepsLockDespiteWaitingMessages(InMemoryProvider):
    """Its ack keeps the lock whenever asked, even with a message of the instance visible and waiting."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        result = super()._ack_orchestration(ack)
        if ack.keep_lock is not None and not isinstance(result, ProviderError):
            lock = _InstanceLock(ack.lock_token, time.time() + ack.keep_lock)
            self._instance_locks[ack.instance_id] = lock
        return result


class ReleasesForFutureMessages(InMemoryProvider):
    """Its ack releases a lock to keep if the instance has any message at all, due or not (a timer)."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        result = super()._ack_orchestration(ack)
        kept = not isinstance(result, ProviderError) and ack.keep_lock is not None
        if kept and any(m.instance_id == ack.instance_id for m in self._orchestrator_queue):
            self._instance_locks.pop(ack.instance_id, None)
        return result


class KeptLockKeepsTheFetchLease(InMemoryProvider):
    """Its ack keeps the lock by not deleting it: the lock lasts the fetch's lease, not ``keep_lock``."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        lock = self._instance_locks.get(ack.instance_id)
        until = lock.locked_until if lock is not None and lock.token == ack.lock_token else None
        result = super()._ack_orchestration(ack)
        kept = self._instance_locks.get(ack.instance_id)
        if until is not None and kept is not None and kept.token == ack.lock_token:
            kept.locked_until = until
        return result


class ReleasedKeptLockWakesNoOne(InMemoryProvider):
    """An ack with ``keep_lock`` that releases anyway (a message waits) does not wake orchestrator waiters."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        if ack.keep_lock is None:
            return super()._ack_orchestration(ack)
        waiters = self._work_arrived["orchestrator"]
        self._work_arrived["orchestrator"] = _Broadcast()  # fired for no one
        try:
            return super()._ack_orchestration(ack)
        finally:
            self._work_arrived["orchestrator"] = waiters


class IgnoresCompletedWorkItems(InMemoryProvider):
    """It declares direct dispatch but ignores ``completed_work_items``: the items stay, leased."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        return super()._ack_orchestration(dataclasses.replace(ack, completed_work_items=()))


class CompletesWorkItemsUnchecked(InMemoryProvider):
    """Its ack deletes ``completed_work_items`` by token without checking that their leases are held."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        result = super()._ack_orchestration(dataclasses.replace(ack, completed_work_items=()))
        if not isinstance(result, ProviderError):
            done = set(ack.completed_work_items)
            self._worker_queue = [row for row in self._worker_queue if row.lock_token not in done]
        return result


class CompletesWorkItemsBeforeValidating(InMemoryProvider):
    """Its ack deletes ``completed_work_items`` before validating the rest: a failed ack loses them."""

    def _ack_orchestration(self, ack: OrchestrationAck) -> OrchestrationAckResult:
        now = time.time()
        held = [token for token in ack.completed_work_items if self._leased_row(token, now) is not None]
        done = set(held)
        self._worker_queue = [row for row in self._worker_queue if row.lock_token not in done]
        return super()._ack_orchestration(dataclasses.replace(ack, completed_work_items=()))


class NoWakeupsDeclared(InMemoryProvider):
    """A correct provider without declared wake-ups: the wake-up tests must skip, naming it."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(wakeups=False)


#: broken provider -> the suite tests it must fail (every parametrisation counts as the test).
CATCHES: dict[type[InMemoryProvider], list[str]] = {
    DeletesUntaggedMessages: [
        "test_ack_deletes_only_the_tagged_messages",
        "test_messages_arriving_during_a_lock_wait_for_its_release",
        "test_future_message_is_neither_delivered_nor_deleted",
        "test_messages_racing_acks_are_delivered_exactly_once",
    ],
    SkipsLockValidation: [
        "test_ack_with_an_unknown_token_fails_permanently",
        "test_token_is_valid_only_for_its_instance",
        "test_second_orchestration_ack_with_one_token_fails",
        "test_ack_after_the_lease_lapsed_fails",
        "test_old_token_is_dead_after_a_takeover",
        "test_lapsed_lease_cannot_be_renewed",
        "test_abandon_after_the_lease_lapsed_fails",
    ],
    LocksTwice: [
        "test_locked_work_is_not_fetched_again",
        "test_messages_arriving_during_a_lock_wait_for_its_release",
        "test_lease_is_not_taken_early",
        "test_racing_fetchers_lock_distinct_instances",
    ],
    CancelsBeforeInserting: ["test_schedule_and_cancel_in_one_ack_leaves_nothing"],
    CreatesOnEnqueue: [
        "test_enqueue_does_not_create_the_instance",
        "test_fetched_item_of_an_uncreated_instance_has_no_instance",
        "test_child_started_by_a_parent_ack_is_created_by_its_own_ack",
        "test_abandoned_start_creates_nothing",
    ],
    AppliesHistoryBeforeValidating: [
        "test_failed_ack_commits_nothing",
        "test_duplicate_event_id_within_one_ack_is_rejected",
    ],
    OverwritesHistory: [
        "test_duplicate_event_id_is_rejected_and_not_overwritten",
        "test_duplicate_event_id_fails_alone_in_a_batch",
        "test_failed_ack_keeps_the_lock",
    ],
    DecrementsUntaggedAttempts: ["test_ignore_attempt_never_goes_below_zero"],
    ClaimsWakeupsButPolls: [
        "test_waits_end_when_work_arrives",
        "test_wait_returns_at_once_when_work_is_waiting",
        "test_ack_items_wake_the_orchestrator_queue",
        "test_completion_wakes_the_orchestrator_queue",
        "test_waits_end_when_a_timer_becomes_due",
        "test_abandon_wakes_waiters",
        "test_instance_change_wakes_waiters",
    ],
    DropsOrphanMessages: ["test_orphan_messages_are_kept"],
    IgnoresVisibility: [
        "test_timer_is_invisible_until_due",
        "test_future_message_does_not_block_other_instances",
        "test_abandon_with_delay_hides_the_work",
    ],
    LeasesNeverLapse: [
        "test_lapsed_lease_can_be_taken",
        "test_fetch_after_a_lapsed_lease_counts",
        "test_racing_fetchers_take_a_lapsed_lease_once",
    ],
    EnqueuesCompletionOfCancelledWork: ["test_failed_ack_of_a_cancelled_activity_enqueues_nothing"],
    LeasesDirectItemsUnleased: [
        "test_only_the_first_n_items_are_leased",
        "test_directly_leased_items_are_not_fetchable",
        "test_lapsed_direct_lease_is_fetched_again",
        "test_direct_lease_acks_renews_and_abandons",
        "test_direct_and_plain_orchestration_acks_mix_in_a_batch",
    ],
    LeasesDirectItemsOnFailedAcks: ["test_failed_direct_ack_leases_nothing"],
    DirectLockIgnoresExistingLock: [
        "test_second_completion_waits_for_the_direct_lock",
        "test_instance_held_by_a_fetcher_is_not_locked_directly",
        "test_direct_and_plain_work_acks_mix_in_a_batch",
    ],
    DirectLockTakesOnlyTheCompletion: [
        "test_direct_lock_holds_every_visible_message",
        "test_lapsed_lock_does_not_stop_a_direct_lock",
    ],
    DirectLockOnLostLease: ["test_lost_lease_with_lock_instance_locks_nothing"],
    ReleasesKeptLocks: [
        "test_kept_lock_holds_the_instance_for_the_next_turns",
        "test_kept_lock_renews_and_abandons",
        "test_kept_lock_lapses_after_keep_lock_seconds",
        "test_future_and_foreign_messages_do_not_release_a_kept_lock",
    ],
    KeepsLockDespiteWaitingMessages: [
        "test_message_waiting_at_commit_releases_a_kept_lock",
        "test_message_arriving_during_a_kept_lock_releases_it_at_the_next_ack",
        "test_own_orchestrator_items_release_a_kept_lock",
        "test_kept_lock_released_for_waiting_messages_wakes_waiters",
    ],
    ReleasesForFutureMessages: ["test_future_and_foreign_messages_do_not_release_a_kept_lock"],
    KeptLockKeepsTheFetchLease: ["test_kept_lock_lapses_after_keep_lock_seconds"],
    ReleasedKeptLockWakesNoOne: ["test_kept_lock_released_for_waiting_messages_wakes_waiters"],
    IgnoresCompletedWorkItems: [
        "test_completed_work_items_are_deleted_by_the_ack",
        "test_fetched_and_direct_leases_complete_alike",
        "test_lost_completed_lease_fails_alone_in_a_batch",
    ],
    CompletesWorkItemsUnchecked: [
        "test_lost_completed_lease_fails_the_whole_ack",
        "test_lost_completed_lease_fails_alone_in_a_batch",
    ],
    CompletesWorkItemsBeforeValidating: ["test_failed_ack_deletes_no_completed_work_items"],
}
