"""The runtime: dispatchers that fetch work from a provider, run it, and commit the results.

Two dispatchers share one provider:

* the orchestration dispatcher fetches batches of locked instances, runs one turn of each in the
  replay engine and commits every turn with one atomic ack;
* the worker dispatcher leases activity executions, runs them (sync functions in a thread pool,
  async ones on the loop), renews their leases while they run, and acks their results.

Acks go through a :class:`_Batcher`: whatever finished while the previous ack was committing is
committed together in the next provider call, so a busy runtime pays one durable commit for many
turns while an idle one commits at once. Live orchestration coroutines are kept in a bounded LRU
cache, so a turn on a cached instance reads no history and replays nothing.

With a provider that supports direct dispatch, work hands over between the two dispatchers
without the queues' fetches: a turn's ack leases the activities it schedules to this runtime
(while activity slots are free) and they start as soon as it commits; an activity's ack locks the
instance its result is for (when no one else holds it) and the turn runs at once. A sequential
workflow then costs two provider calls per step instead of four. When the turn waits on a single
activity that ran quickly last time, its ack even keeps the instance locked until the result is
back (for at most ``hold_instance``), and the step costs one call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from perdure import history as h
from perdure.client import Client
from perdure.context import ActivityContext, orchestration_body
from perdure.engine import Engine, TurnResult, error_details
from perdure.errors import NondeterminismError
from perdure.limits import HISTORY_WARNING_EVENTS, check_payload
from perdure.provider import (
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
    encode_error,
)
from perdure.registry import ActivityDef, OrchestrationDef, Registry
from perdure.serialization import dumps, loads

_log = logging.getLogger("perdure.runtime")

A = TypeVar("A")
R = TypeVar("R")

#: Seconds a cancelled activity gets to stop by itself at shutdown before it is abandoned.
_CANCEL_GRACE = 1.0
#: Tries of an ack that fails with a retryable error before the work is left to run again.
_ACK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Knobs of a :class:`Runtime`; the defaults suit most deployments.

    Attributes:
        orchestration_dispatchers: concurrent fetch-run-ack loops for orchestrations.
        orchestration_batch: most instances locked per fetch.
        activity_concurrency: most activities running at once in this process.
        worker_batch: most activities leased per fetch.
        thread_pool_size: threads for sync activities (default: ``activity_concurrency``).
        orchestration_lock_timeout: instance lock lease, seconds.
        activity_lock_timeout: activity lease, seconds; renewed every third of it while running.
        poll_interval: longest idle wait between fetches (wake-ups usually come sooner).
        max_attempts: fetches of one message before it is treated as poison and its instance or
            activity failed with the poison details.
        unknown_name_backoff: first delay, seconds, before retrying work whose orchestration or
            activity is not registered here (a rolling deploy may bring it); doubles per attempt.
        unknown_name_max_backoff: cap of that delay.
        cache_size: live orchestrations kept in memory (0 disables the cache; results are the same).
        shutdown_timeout: how long shutdown waits for in-flight activities by default.
        direct_dispatch: hand work from an ack straight to this runtime when the provider
            supports it (``capabilities.direct_dispatch``): activities a turn schedules run here
            without a fetch while slots are free, and the turn an activity's result wakes runs
            here without a fetch. Off, every hand-over goes through the queues; results are the
            same either way.
        hold_instance: with direct dispatch, seconds an instance stays locked by this runtime
            after a turn that waits on one activity whose last run here took under half as long,
            so the turn its result wakes needs no hand-over call. Other messages for the instance
            wait at most this long (an ack never keeps a lock while messages are waiting). 0
            disables holding.

    """

    orchestration_dispatchers: int = 2
    orchestration_batch: int = 64
    activity_concurrency: int = 64
    worker_batch: int = 64
    thread_pool_size: int | None = None
    orchestration_lock_timeout: float = 30.0
    activity_lock_timeout: float = 30.0
    poll_interval: float = 1.0
    max_attempts: int = 10
    unknown_name_backoff: float = 1.0
    unknown_name_max_backoff: float = 60.0
    cache_size: int = 10_000
    shutdown_timeout: float = 30.0
    direct_dispatch: bool = True
    hold_instance: float = 0.05


class _Batcher(Generic[A, R]):
    """Coalesce concurrent submissions into one provider call; each caller gets its own results."""

    def __init__(self, call: Callable[[Sequence[A]], Awaitable[list[R | ProviderError]]]) -> None:
        self._call = call
        self._pending: list[tuple[Sequence[A], asyncio.Future[list[R | ProviderError]]]] = []
        self._flushing = False
        #: The task committing the current batch, if any (shutdown waits for it).
        self.flusher: asyncio.Future[None] | None = None

    def submit(self, items: Sequence[A]) -> asyncio.Future[list[R | ProviderError]]:
        """Queue ``items`` now (their provider call is made before any later submission's).

        The future resolves with their results, in order.
        """
        future: asyncio.Future[list[R | ProviderError]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        if not self._flushing:
            self._flushing = True
            self.flusher = asyncio.ensure_future(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                items = [item for group, _ in batch for item in group]
                results: list[R | ProviderError]
                try:
                    results = await self._call(items)
                except ProviderError as exc:
                    results = [exc] * len(items)
                except Exception as exc:  # a provider bug must not strand the callers
                    error = ProviderError("ack", f"unexpected {type(exc).__name__}: {exc}", retryable=True)
                    results = [error] * len(items)
                start = 0
                for group, future in batch:
                    end = start + len(group)
                    if not future.done():
                        future.set_result(results[start:end])
                    start = end
        finally:
            self._flushing = False


class _Slots:
    """Free activity slots: the worker loop waits for one, a direct lease takes what is free now."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self) -> None:
        """Take one slot, waiting until one is released."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we were cancelled: hand it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def try_take(self, wanted: int) -> int:
        """Take up to ``wanted`` slots that are free right now; return how many were taken."""
        taken = min(wanted, self.free) if wanted > 0 else 0
        self.free -= taken
        return taken

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots, waking waiters first."""
        for _ in range(count):
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    break
            else:
                self.free += 1


class _Waker:
    """Wait for work: the provider's wake-up, or a nudge from this runtime.

    When this process produces work for the other dispatcher (a turn that schedules activities,
    an activity result for an orchestration), it nudges that dispatcher instead of waiting for
    the provider's signal. With a provider whose calls take effect in order
    (``capabilities.ordered_calls``, e.g. SQLite) the nudge comes as the ack is submitted, so the
    fetch travels right behind the ack and both share one transaction; otherwise it comes once the
    ack has committed, so the fetch is never wasted on work that is not there yet.
    """

    def __init__(self, provider: Provider, queue: Queue) -> None:
        self._provider = provider
        self._queue = queue
        self._nudged = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def nudge(self) -> None:
        """Wake one waiting dispatcher loop (or the next one to wait)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._nudged = True

    async def wait(self, timeout: float) -> None:
        if self._nudged:
            self._nudged = False
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        provider_wait = asyncio.ensure_future(self._provider.wait_for_work(self._queue, timeout))
        try:
            await asyncio.wait([waiter, provider_wait], return_when=asyncio.FIRST_COMPLETED)
        finally:
            provider_wait.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


@dataclass(eq=False, slots=True)
class _Running:
    """An activity this runtime is executing; ``done`` resolves when its slot is freed."""

    lease: WorkItemLease
    ctx: ActivityContext
    done: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    started: float = 0.0


@dataclass(eq=False, slots=True)
class _Held:
    """An instance whose lock this runtime kept while the one activity its turn awaits runs here."""

    #: The instance as the next turn sees it (the runtime's own view after the kept ack).
    instance: InstanceInfo
    lock_token: str
    #: The lease of the awaited activity; its result is the next turn's only message.
    lease_token: str
    timer: asyncio.TimerHandle | None = None


class _EngineCache:
    """A bounded LRU of live engines keyed by instance id, valid for one stored history position."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, Engine] = OrderedDict()

    def get(self, instance_id: str, execution_id: int, last_event_id: int) -> Engine | None:
        engine = self._items.get(instance_id)
        if engine is None:
            return None
        if engine.execution_id != execution_id or engine.last_event_id != last_event_id:
            del self._items[instance_id]
            return None
        self._items.move_to_end(instance_id)
        return engine

    def put(self, instance_id: str, engine: Engine) -> None:
        if self._size <= 0:
            return
        self._items[instance_id] = engine
        self._items.move_to_end(instance_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def evict(self, instance_id: str) -> None:
        self._items.pop(instance_id, None)

    def __len__(self) -> int:
        return len(self._items)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Runtime:
    """Runs the registered orchestrations and activities against a provider.

    Use as ``async with Runtime(provider, registry) as runtime:`` or call :meth:`start` and
    :meth:`shutdown`. Any number of runtimes (in one or many processes) may share a provider's
    store if the provider supports it; each instance is run by one of them at a time.
    """

    def __init__(self, provider: Provider, registry: Registry, options: RuntimeOptions | None = None) -> None:
        self.provider = provider
        self.registry = registry
        self.options = options or RuntimeOptions()
        self.client = Client(provider, registry)
        self._cache = _EngineCache(self.options.cache_size)
        self._orch_acks: _Batcher[OrchestrationAck, OrchestrationAckResult] = _Batcher(
            provider.ack_orchestration_items
        )
        self._work_acks: _Batcher[WorkItemAck, WorkItemAckResult] = _Batcher(provider.ack_work_items)
        self._tasks: list[asyncio.Task[None]] = []
        #: Turns started by a direct hand-over from an activity's ack (shutdown waits for them).
        self._direct_turns: set[asyncio.Future[None]] = set()
        #: Instances whose lock this runtime kept for the result of one quick activity.
        self._held: dict[str, _Held] = {}
        #: Per activity name: did its last run here finish within half of ``hold_instance``?
        self._quick: dict[str, bool] = {}
        self._activities: dict[str, _Running] = {}
        self._by_ref: dict[h.ActivityRef, str] = {}
        self._bodies: dict[OrchestrationDef, Callable[[Engine, str], Any]] = {}
        self._thread_lock = threading.Lock()
        self._thread_done: list[tuple[WorkItemLease, concurrent.futures.Future[Any]]] = []
        self._drain_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = _Slots(self.options.activity_concurrency)
        capabilities = provider.capabilities
        self._ordered_calls = capabilities.ordered_calls
        self._direct = self.options.direct_dispatch and capabilities.direct_dispatch
        self._orchestrator_waker = _Waker(provider, "orchestrator")
        self._worker_waker = _Waker(provider, "worker")
        self._pool: ThreadPoolExecutor | None = None
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the provider and start the dispatchers."""
        if self._running:
            return
        await self.provider.open()
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._pool = ThreadPoolExecutor(
            max_workers=self.options.thread_pool_size or self.options.activity_concurrency,
            thread_name_prefix="perdure-activity",
        )
        for _ in range(self.options.orchestration_dispatchers):
            self._tasks.append(asyncio.create_task(self._orchestration_loop()))
        self._tasks.append(asyncio.create_task(self._worker_loop()))
        self._tasks.append(asyncio.create_task(self._renewal_loop()))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop fetching, let in-flight activities finish within ``timeout``, then stop.

        Activities still running after the timeout get the cancel signal and one more second;
        then their leases are released so another worker retries them at once. Orchestration
        turns in progress finish (they take milliseconds). The provider is left open for the
        caller to close.
        """
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        # Held instances go back now: the results of their activities take the queue from here.
        await asyncio.gather(*(self._unhold(held) for held in list(self._held.values())))
        wait = self.options.shutdown_timeout if timeout is None else timeout
        running = [r.done for r in self._activities.values()]
        if running:
            _done, still = await asyncio.wait(running, timeout=wait)
            if still:
                # Ask politely first, then stop waiting; the leases go back to the queue.
                for entry in self._activities.values():
                    entry.ctx._cancel()
                _done, still = await asyncio.wait(still, timeout=_CANCEL_GRACE)
            for entry in list(self._activities.values()):
                if entry.done in still:
                    if entry.task is not None:
                        entry.task.cancel()
                    self._release(entry.lease)
                    try:
                        await self.provider.abandon_work_item(entry.lease.lock_token, ignore_attempt=True)
                    except ProviderError as exc:
                        _log.warning("could not release activity lease at shutdown: %s", exc)
            await asyncio.gather(
                *(e.task for e in self._activities.values() if e.task), return_exceptions=True
            )
        while self._direct_turns:
            await asyncio.gather(*self._direct_turns, return_exceptions=True)
        # Acks already handed to the provider finish before the caller may close it.
        flushing = [b.flusher for b in (self._orch_acks, self._work_acks) if b.flusher is not None]
        await asyncio.gather(*flushing, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()

    # -- orchestrations -----------------------------------------------------------------------

    async def _orchestration_loop(self) -> None:
        options = self.options
        failures = 0
        while True:
            try:
                items = await self.provider.fetch_orchestration_items(
                    options.orchestration_batch, options.orchestration_lock_timeout
                )
                failures = 0
            except Exception as exc:
                failures += 1
                await self._backoff("fetch orchestration work", exc, failures)
                continue
            if not items:
                await self._orchestrator_waker.wait(options.poll_interval)
                continue
            await self._run_items(items)
            if len(items) < options.orchestration_batch:
                # We took everything that was ready; sleep until the provider signals more.
                await self._orchestrator_waker.wait(options.poll_interval)

    async def _run_items(self, items: Sequence[OrchestrationItem]) -> None:
        """Run one turn of each locked instance and commit them together."""
        # Turns on cached or new instances never wait on I/O: run them in line. Only cache
        # misses read history, and those reads run concurrently.
        cold = [item for item in items if self._needs_history(item)]
        cold_ids = {id(item) for item in cold}
        hot = [await self._turn(item) for item in items if id(item) not in cold_ids]
        if cold:
            hot.extend(await asyncio.gather(*(self._turn(item) for item in cold)))
        acks = [ack for ack in hot if ack is not None]
        if acks:
            await self._commit_turns(acks)

    def _run_direct(self, item: OrchestrationItem) -> None:
        """Run the turn of an instance an activity's ack locked for us, outside the fetch loops."""
        self._spawn(self._run_items([item]))

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run hand-over work in the background; shutdown waits for it."""
        turn = asyncio.ensure_future(work)
        self._direct_turns.add(turn)
        turn.add_done_callback(self._direct_turn_done)

    def _direct_turn_done(self, turn: asyncio.Future[None]) -> None:
        self._direct_turns.discard(turn)
        if not turn.cancelled() and turn.exception() is not None:
            _log.error("a directly dispatched turn failed", exc_info=turn.exception())

    async def _backoff(self, what: str, error: Exception, failures: int) -> None:
        """Log a failed fetch and wait before the next one (exponential, capped)."""
        delay = min(0.05 * 2 ** min(failures, 10), self.options.poll_interval * 5)
        if not isinstance(error, ProviderError):  # a provider bug: show where it happened
            _log.error("could not %s; retrying in %.2f s", what, delay, exc_info=error)
        else:
            level = logging.WARNING if failures < 5 and error.retryable else logging.ERROR
            _log.log(level, "could not %s (%s); retrying in %.2f s", what, error, delay)
        await asyncio.sleep(delay)

    async def _commit_turns(self, acks: list[OrchestrationAck]) -> list[OrchestrationAck]:
        """Commit the turns (retrying retryable failures); return the acks that did not commit."""
        if self._direct and self._running:
            for ack in acks:
                self._lease_directly(ack)
        failed: list[OrchestrationAck] = []
        pending = acks
        for attempt in range(1, _ACK_ATTEMPTS + 1):
            submitted = self._orch_acks.submit(pending)
            queued_work = any(len(ack.worker_items) > ack.lease_worker_items for ack in pending)
            if queued_work and self._ordered_calls:
                self._worker_waker.nudge()
            results = await submitted
            if queued_work and not self._ordered_calls:
                self._worker_waker.nudge()
            retry: list[OrchestrationAck] = []
            for ack, result in zip(pending, results, strict=True):
                if not isinstance(result, ProviderError):
                    self._after_commit(ack, result)
                    continue
                self._cache.evict(ack.instance_id)
                if result.retryable and attempt < _ACK_ATTEMPTS:
                    retry.append(ack)  # its reserved slots stay reserved for the retry
                    continue
                self._slots.release(ack.lease_worker_items)
                failed.append(ack)
                if ack.completed_work_items and not result.retryable:
                    # A held instance the store let go (messages arrived meanwhile, or the hold
                    # lapsed): the activity's result now goes through the queue instead.
                    _log.debug("held turn of %r not committed: %s", ack.instance_id, result)
                else:
                    _log.warning(
                        "turn of %r was not committed (%s); it will run again", ack.instance_id, result
                    )
                # Release the lock if it is still held: a retryable failure left it, a failure of
                # a held turn's leases leaves it, and a lost reply may have kept it after all.
                await self._abandon_turn(ack.lock_token)
            if not retry:
                return failed
            await asyncio.sleep(0.05 * attempt)
            pending = retry
        return failed

    def _lease_directly(self, ack: OrchestrationAck) -> None:
        """Ask the ack to lease its leading activities to us, one free slot each."""
        if not ack.worker_items:
            return
        wanted = len(ack.worker_items)
        if ack.cancelled_activities:
            cancelled = set(ack.cancelled_activities)
            wanted = next(
                (
                    n
                    for n, item in enumerate(ack.worker_items)
                    if h.ActivityRef(item.instance_id, item.execution_id, item.activity_id) in cancelled
                ),
                wanted,
            )
        ack.lease_worker_items = self._slots.try_take(wanted)
        ack.worker_lease_timeout = self.options.activity_lock_timeout
        if (
            ack.lease_worker_items == 1
            and len(ack.worker_items) == 1
            and ack.status in (None, "running")
            and ack.history
            and self._quick.get(ack.worker_items[0].name, False)
        ):
            ack.keep_lock = self.options.orchestration_lock_timeout

    def _after_commit(self, ack: OrchestrationAck, leases: list[WorkItemLease] | None) -> None:
        """Start the activities the ack leased to us; signal those it cancelled."""
        for ref in ack.cancelled_activities:
            token = self._by_ref.get(ref)
            entry = self._activities.get(token) if token is not None else None
            if entry is not None:
                entry.ctx._cancel()
        if ack.lease_worker_items:
            leases = leases or []
            self._slots.release(ack.lease_worker_items - len(leases))
            if ack.keep_lock is not None and len(leases) == 1:
                self._hold(ack, leases[0])
            for lease in leases:
                self._start(lease)

    def _hold(self, ack: OrchestrationAck, lease: WorkItemLease) -> None:
        """Remember an instance whose lock the ack kept (if the store let it go, the next ack says so)."""
        last_event_id = max(event.event_id for event in ack.history)
        instance = InstanceInfo(
            instance_id=ack.instance_id,
            name=ack.name,
            version=ack.version,
            execution_id=ack.execution_id,
            status="running",
            output=None,
            parent_instance_id=ack.parent.instance_id if ack.parent else None,
            custom_status=None,
            custom_status_version=0,
            last_event_id=last_event_id,
            created_at_ms=0,
            updated_at_ms=0,
        )
        held = _Held(instance, ack.lock_token, lease.lock_token)
        assert self._loop is not None
        held.timer = self._loop.call_later(self.options.hold_instance, self._hold_lapsed, held)
        self._held[ack.instance_id] = held

    def _hold_lapsed(self, held: _Held) -> None:
        """The activity took longer than ``hold_instance``: let the instance go."""
        if self._held.get(held.instance.instance_id) is held:
            self._spawn(self._unhold(held))

    async def _unhold(self, held: _Held) -> None:
        """Release a held instance's lock; its activity's result will take the queue."""
        if self._held.get(held.instance.instance_id) is not held:
            return
        del self._held[held.instance.instance_id]
        if held.timer is not None:
            held.timer.cancel()
        await self._abandon_turn(held.lock_token)
        self._orchestrator_waker.nudge()  # a result that found the instance still locked

    async def _run_held(self, held: _Held, lease: WorkItemLease, completion: h.Message) -> None:
        """Run the turn a held instance's activity result wakes, consuming its lease in the ack."""
        item = OrchestrationItem(held.instance.instance_id, held.lock_token, 1, [completion], held.instance)
        ack = await self._turn(item)
        if ack is not None:
            ack.completed_work_items = [lease.lock_token]
            if not await self._commit_turns([ack]):
                self._release(lease)
                return
        self._ack_work(lease, completion)  # not committed: the lease is still ours

    async def _abandon_turn(self, lock_token: str, delay: float = 0.0) -> None:
        try:
            await self.provider.abandon_orchestration_item(lock_token, delay=delay)
        except ProviderError as exc:
            _log.debug("abandon failed (the lock will expire instead): %s", exc)

    def _body(self, definition: OrchestrationDef) -> Callable[[Engine, str], Any]:
        body = self._bodies.get(definition)
        if body is None:
            body = self._bodies[definition] = orchestration_body(definition, self.registry)
        return body

    def _needs_history(self, item: OrchestrationItem) -> bool:
        instance = item.instance
        return (
            instance is not None
            and instance.status == "running"
            and instance.last_event_id > 0
            and self._cache.get(item.instance_id, instance.execution_id, instance.last_event_id) is None
        )

    async def _turn(self, item: OrchestrationItem) -> OrchestrationAck | None:
        """Run one turn for a locked instance; return its ack, or None if it was abandoned.

        A parent's start for an instance id that is already taken is answered with a failure to
        that parent, so a clash of child ids never leaves a parent waiting forever.
        """
        try:
            ack = await self._run_turn(item)
        except Exception:  # a bug must cost one instance a delayed retry, never the dispatcher
            _log.exception("turn of %r failed unexpectedly; it will be retried", item.instance_id)
            self._cache.evict(item.instance_id)
            await self._abandon_turn(item.lock_token, 1.0)
            return None
        if ack is None:
            return None
        used = None if item.instance is not None else self._start_of(item)
        clashes = [
            m for m in item.messages if isinstance(m, h.StartOrchestration) and m.parent and m is not used
        ]
        if clashes:
            ack.orchestrator_items = [
                *ack.orchestrator_items,
                *(
                    _parent_error(
                        m.parent,
                        h.ErrorDetails(
                            "application",
                            "InstanceAlreadyExists",
                            f"instance {item.instance_id!r} already exists; give the sub-orchestration "
                            "another instance_id",
                        ),
                    )
                    for m in clashes
                    if m.parent is not None
                ),
            ]
        return ack

    @staticmethod
    def _start_of(item: OrchestrationItem) -> h.StartOrchestration | h.ContinueAsNew | None:
        return next((m for m in item.messages if isinstance(m, h.StartOrchestration | h.ContinueAsNew)), None)

    async def _run_turn(self, item: OrchestrationItem) -> OrchestrationAck | None:
        instance = item.instance
        for problem in item.bad_messages:
            _log.error("dropping undecodable message for %r: %s", item.instance_id, problem)
        start = self._start_of(item)
        if instance is None or instance.status == "continued_as_new":
            if start is None or (
                instance is not None
                and not (
                    isinstance(start, h.ContinueAsNew) and start.execution_id == instance.execution_id + 1
                )
            ):
                return self._empty_ack(item, "the instance has not started")
            execution_id = start.execution_id if isinstance(start, h.ContinueAsNew) else 1
            name, version, last_event_id = start.name, start.version, 0
        elif instance.status != "running":
            return self._empty_ack(item, f"the instance is {instance.status}")
        else:
            execution_id, name, version = instance.execution_id, instance.name, instance.version
            last_event_id = instance.last_event_id

        if item.attempt_count > self.options.max_attempts:
            return await self._poison(item, name, version, execution_id, last_event_id, start)

        # A new execution without a version runs (and pins) the latest; a running one keeps its own.
        definition = self.registry.orchestration_def(name, version, exact=last_event_id > 0)
        if definition is None:
            delay = min(
                self.options.unknown_name_backoff * 2 ** (item.attempt_count - 1),
                self.options.unknown_name_max_backoff,
            )
            _log.warning(
                "orchestration %r%s of %r is not registered here; retrying in %.1f s (attempt %d of %d)",
                name,
                f" version {version!r}" if version else "",
                item.instance_id,
                delay,
                item.attempt_count,
                self.options.max_attempts,
            )
            await self._abandon_turn(item.lock_token, delay)
            return None

        engine = self._cache.get(item.instance_id, execution_id, last_event_id)
        if engine is None:
            engine = Engine(
                instance_id=item.instance_id,
                execution_id=execution_id,
                name=name,
                body=self._body(definition),
                version=definition.version,
            )
            if last_event_id > 0:
                try:
                    history = await self.provider.read_history(item.instance_id, execution_id)
                except ProviderError as exc:
                    _log.error("cannot read history of %r: %s", item.instance_id, exc)
                    await self._abandon_turn(item.lock_token, 1.0)
                    return None
                try:
                    engine.replay(history)
                except NondeterminismError as exc:
                    return self._failure_ack(
                        item, engine, name, version, error_details(exc, "nondeterminism")
                    )
                if last_event_id >= HISTORY_WARNING_EVENTS and len(history) == last_event_id:
                    _log.warning(
                        "history of %r has %d events; consider ctx.continue_as_new to keep turns fast",
                        item.instance_id,
                        last_event_id,
                    )
        turn = engine.run_turn(_now_ms(), item.messages)
        for reason in turn.dropped:
            _log.debug("instance %r dropped %s", item.instance_id, reason)
        if engine.finished:
            self._cache.evict(item.instance_id)
        else:
            self._cache.put(item.instance_id, engine)
        return self._ack_for(item, engine, name, version, turn)

    def _ack_for(
        self, item: OrchestrationItem, engine: Engine, name: str, version: str | None, turn: TurnResult
    ) -> OrchestrationAck:
        return OrchestrationAck(
            lock_token=item.lock_token,
            instance_id=item.instance_id,
            execution_id=engine.execution_id,
            name=name,
            version=engine.version if engine.version is not None else version,
            parent=engine.parent,
            history=turn.new_events,
            worker_items=turn.worker_items,
            orchestrator_items=turn.orchestrator_items,
            cancelled_activities=turn.cancelled_activities,
            status=turn.status,
            output=turn.output,
            custom_status_changed=turn.custom_status_changed,
            custom_status=turn.custom_status,
        )

    def _empty_ack(self, item: OrchestrationItem, why: str) -> OrchestrationAck:
        for message in item.messages:
            _log.info("dropping %s for %r: %s", message.TYPE, item.instance_id, why)
        instance = item.instance
        return OrchestrationAck(
            lock_token=item.lock_token,
            instance_id=item.instance_id,
            execution_id=instance.execution_id if instance else 0,
            name=instance.name if instance else "",
            version=instance.version if instance else None,
        )

    def _failure_ack(
        self, item: OrchestrationItem, engine: Engine, name: str, version: str | None, details: h.ErrorDetails
    ) -> OrchestrationAck:
        """Fail an instance whose replay broke (nondeterminism): one terminal event after history."""
        _log.error("instance %r failed: %s", item.instance_id, details.message)
        self._cache.evict(item.instance_id)
        last = item.instance.last_event_id if item.instance else 0
        turn = TurnResult(
            new_events=[h.OrchestrationFailed(event_id=last + 1, timestamp_ms=_now_ms(), error=details)],
            status="failed",
            output=encode_error(details),
        )
        if engine.parent is not None:
            turn.orchestrator_items.append(_parent_error(engine.parent, details))
        return self._ack_for(item, engine, name, version, turn)

    async def _poison(
        self,
        item: OrchestrationItem,
        name: str,
        version: str | None,
        execution_id: int,
        last_event_id: int,
        start: h.StartOrchestration | h.ContinueAsNew | None,
    ) -> OrchestrationAck:
        """Fail an instance whose messages were fetched too often (a crash loop or bad data)."""
        why = (
            f"orchestration {name!r} is not registered on any runtime that fetched it"
            if self.registry.orchestration_def(name, version) is None
            else "its turns kept failing to commit"
        )
        details = h.ErrorDetails(
            "poison",
            "PoisonMessage",
            f"instance {item.instance_id!r} was fetched {item.attempt_count} times without completing a turn "
            f"(max_attempts={self.options.max_attempts}): {why}; its last messages were "
            + ", ".join(m.TYPE for m in item.messages),
        )
        _log.error("%s", details.message)
        self._cache.evict(item.instance_id)
        now = _now_ms()
        events: list[h.Event] = []
        parent: h.ParentRef | None = None
        if last_event_id == 0 and start is not None:
            parent = start.parent
            events.append(
                h.OrchestrationStarted(
                    event_id=1, timestamp_ms=now, name=name, version=version, input=start.input, parent=parent
                )
            )
        else:
            try:
                first = (await self.provider.read_history(item.instance_id, execution_id))[:1]
                if first and isinstance(first[0], h.OrchestrationStarted):
                    parent = first[0].parent
            except ProviderError as exc:
                _log.error("cannot find the parent of poisoned %r: %s", item.instance_id, exc)
        events.append(
            h.OrchestrationFailed(event_id=last_event_id + len(events) + 1, timestamp_ms=now, error=details)
        )
        return OrchestrationAck(
            lock_token=item.lock_token,
            instance_id=item.instance_id,
            execution_id=execution_id,
            name=name,
            version=version,
            parent=parent,
            history=events,
            orchestrator_items=[_parent_error(parent, details)] if parent else [],
            status="failed",
            output=encode_error(details),
        )

    # -- activities ---------------------------------------------------------------------------

    async def _worker_loop(self) -> None:
        options = self.options
        slots = self._slots
        failures = 0
        while True:
            await slots.take()
            free = 1 + slots.try_take(options.worker_batch - 1)
            try:
                leases = await self.provider.fetch_work_items(free, options.activity_lock_timeout)
                failures = 0
            except Exception as exc:
                slots.release(free)
                failures += 1
                await self._backoff("fetch activity work", exc, failures)
                continue
            slots.release(free - len(leases))
            if not leases:
                await self._worker_waker.wait(options.poll_interval)
                continue
            for lease in leases:
                self._start(lease)
            if len(leases) < free:
                await self._worker_waker.wait(options.poll_interval)

    def _start(self, lease: WorkItemLease) -> None:
        """Start a leased activity that holds a slot; on a bug, free the slot and let the lease lapse."""
        try:
            self._launch(lease)
        except Exception:  # never lose the dispatcher; the lease lapses and is retried
            _log.exception("could not start activity %s", lease.ref)
            if lease.lock_token in self._activities:
                self._release(lease)
            else:
                self._slots.release()

    def _launch(self, lease: WorkItemLease) -> None:
        """Start one leased activity: in the thread pool (sync) or as a task (async)."""
        loop = asyncio.get_running_loop()
        ctx = ActivityContext(
            instance_id=lease.ref.instance_id,
            execution_id=lease.ref.execution_id,
            activity_id=lease.ref.activity_id,
            name=lease.item.name if lease.item else "?",
            attempt=lease.attempt_count,
            client=self.client,
            loop=loop,
        )
        running = _Running(lease, ctx, loop.create_future(), started=time.monotonic())
        self._activities[lease.lock_token] = running
        self._by_ref[lease.ref] = lease.lock_token
        prepared = self._prepare(lease, ctx)
        if isinstance(prepared, float):
            running.task = asyncio.create_task(self._abandon_activity(lease, prepared))
        elif not isinstance(prepared, tuple):
            self._finish(lease, prepared)
        elif prepared[0].is_async:
            running.task = asyncio.create_task(self._run_async(lease, *prepared))
        else:
            assert self._pool is not None
            definition, args = prepared
            future = self._pool.submit(definition.fn, *args)
            future.add_done_callback(functools.partial(self._from_thread, lease))

    def _prepare(
        self, lease: WorkItemLease, ctx: ActivityContext
    ) -> h.Message | float | tuple[ActivityDef, list[Any]]:
        """What to do with a lease: a completion to send now, a delay to abandon it for, or a call."""
        item = lease.item
        if item is None:
            return self._failure(
                lease, h.ErrorDetails("poison", "UndecodableWorkItem", lease.decode_error or "undecodable")
            )
        definition = self.registry.activity_def(item.name)
        if lease.attempt_count > self.options.max_attempts:
            why = (
                "it is not registered on any worker that fetched it"
                if definition is None
                else "it kept crashing"
            )
            return self._failure(
                lease,
                h.ErrorDetails(
                    "poison",
                    "PoisonMessage",
                    f"activity {item.name!r} was fetched {lease.attempt_count} times without "
                    f"completing: {why}",
                ),
            )
        if definition is None:
            delay = min(
                self.options.unknown_name_backoff * 2 ** (lease.attempt_count - 1),
                self.options.unknown_name_max_backoff,
            )
            _log.warning("activity %r is not registered here; retrying in %.1f s", item.name, delay)
            return float(delay)
        args: list[Any] = [ctx] if definition.takes_context else []
        if definition.takes_input:
            try:
                args.append(loads(item.input, definition.input_type, what=f"input of activity {item.name!r}"))
            except Exception as exc:
                return self._failure(lease, error_details(exc))
        return definition, args

    @staticmethod
    def _failure(lease: WorkItemLease, details: h.ErrorDetails) -> h.Message:
        ref = lease.ref
        return h.ActivityError(
            instance_id=ref.instance_id,
            execution_id=ref.execution_id,
            source_id=ref.activity_id,
            error=details,
        )

    def _outcome(self, lease: WorkItemLease, value: Any, error: BaseException | None) -> h.Message:
        """The completion message for an activity's return value or exception."""
        if error is None:
            what = f"result of activity {lease.item.name if lease.item else '?'!r}"
            try:
                result = check_payload(dumps(value, what=what), what)
            except Exception as exc:
                error = exc
            else:
                ref = lease.ref
                return h.ActivityResult(
                    instance_id=ref.instance_id,
                    execution_id=ref.execution_id,
                    source_id=ref.activity_id,
                    result=result,
                )
        return self._failure(lease, error_details(error))

    async def _run_async(self, lease: WorkItemLease, definition: ActivityDef, args: list[Any]) -> None:
        try:
            value = await definition.fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._finish(lease, self._outcome(lease, None, exc))
        else:
            self._finish(lease, self._outcome(lease, value, None))

    def _from_thread(self, lease: WorkItemLease, future: concurrent.futures.Future[Any]) -> None:
        """Called in a pool thread when a sync activity returns: hand the outcome to the loop.

        Outcomes are queued and the loop is woken once per burst, not once per activity.
        """
        with self._thread_lock:
            self._thread_done.append((lease, future))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: the lease will lapse
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._drain_threads)

    def _drain_threads(self) -> None:
        with self._thread_lock:
            done, self._thread_done = self._thread_done, []
            self._drain_scheduled = False
        for lease, future in done:
            error = future.exception()
            self._finish(lease, self._outcome(lease, None if error else future.result(), error))

    async def _abandon_activity(self, lease: WorkItemLease, delay: float) -> None:
        try:
            await self.provider.abandon_work_item(lease.lock_token, delay=delay)
        except ProviderError as exc:
            _log.debug("abandon failed (the lease will expire instead): %s", exc)
        self._release(lease)

    def _finish(self, lease: WorkItemLease, completion: h.Message) -> None:
        """Hand an activity's completion over: to its held instance's next turn, or by an ack."""
        running = self._activities.get(lease.lock_token)
        if running is None:
            return  # released at shutdown; its lease went back to the queue
        if lease.item is not None and self.options.hold_instance > 0:
            took = time.monotonic() - running.started
            self._quick[lease.item.name] = took < self.options.hold_instance / 2
        instance_id = lease.ref.instance_id
        held = self._held.get(instance_id)
        if held is not None and held.lease_token == lease.lock_token and self._running:
            del self._held[instance_id]
            if held.timer is not None:
                held.timer.cancel()
            self._spawn(self._run_held(held, lease, completion))
            return
        self._ack_work(lease, completion)

    def _ack_work(self, lease: WorkItemLease, completion: h.Message, attempt: int = 1) -> None:
        """Ack the activity with its completion (batched with others) and free its slot.

        With direct dispatch the ack also locks the instance the completion is for, and its turn
        runs here at once; otherwise the orchestration dispatcher is nudged to fetch it.
        """
        if lease.lock_token not in self._activities:
            return  # released at shutdown; its lease went back to the queue
        direct = self._direct and self._running
        lock = self.options.orchestration_lock_timeout if direct else None
        acked = self._work_acks.submit([WorkItemAck(lease.lock_token, completion, lock)])
        if self._ordered_calls and not direct:
            self._orchestrator_waker.nudge()
        acked.add_done_callback(functools.partial(self._acked, lease, completion, attempt, direct))

    def _acked(
        self,
        lease: WorkItemLease,
        completion: h.Message,
        attempt: int,
        direct: bool,
        acked: asyncio.Future[list[WorkItemAckResult]],
    ) -> None:
        [result] = acked.result()
        error = result if isinstance(result, ProviderError) else None
        if isinstance(result, OrchestrationItem):
            self._run_direct(result)
        elif error is None and (direct or not self._ordered_calls):
            self._orchestrator_waker.nudge()
        if error is not None and error.retryable and attempt < _ACK_ATTEMPTS and self._running:
            # A blip (busy store, dropped connection): the lease is likely still ours, so retry
            # rather than let the activity run again after the lease lapses.
            loop = asyncio.get_running_loop()
            loop.call_later(0.05 * attempt, self._ack_work, lease, completion, attempt + 1)
            return
        if error is not None:
            _log.info(
                "result of activity %r for %r discarded (%s): it was cancelled or its lease lapsed",
                lease.item.name if lease.item else "?",
                lease.ref.instance_id,
                error,
            )
        self._release(lease)

    def _release(self, lease: WorkItemLease) -> None:
        running = self._activities.pop(lease.lock_token, None)
        if running is None:
            return
        self._by_ref.pop(lease.ref, None)
        if not running.done.done():
            running.done.set_result(None)
        self._slots.release()

    async def _renewal_loop(self) -> None:
        """Renew the leases of running activities; a lost lease is the cancel signal."""
        interval = self.options.activity_lock_timeout / 3
        while True:
            await asyncio.sleep(interval)
            tokens = list(self._activities)
            if not tokens:
                continue
            try:
                held = await self.provider.renew_work_item_locks(tokens, self.options.activity_lock_timeout)
            except ProviderError as exc:
                _log.warning("could not renew activity leases: %s", exc)
                continue
            for token, ok in zip(tokens, held, strict=True):
                entry = self._activities.get(token)
                if not ok and entry is not None:
                    entry.ctx._cancel()


def _parent_error(parent: h.ParentRef, details: h.ErrorDetails) -> h.Message:
    return h.SubOrchestrationError(
        instance_id=parent.instance_id,
        execution_id=parent.execution_id,
        source_id=parent.source_id,
        error=details,
    )


__all__ = ["Runtime", "RuntimeOptions"]
