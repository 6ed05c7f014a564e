"""Wake-ups: LISTEN/NOTIFY on a dedicated connection, plus local signals and timer deadlines.

Notifications are hints, never the source of truth: a lost one costs latency (the runtime keeps a
fallback poll), never correctness. The pieces:

* :class:`WakeHub` is what ``wait_for_work`` and ``wait_for_instance_change`` wait on. It is fed
  by the listener (other processes' commits), directly by the provider after its own commits (no
  round trip through the server), and by a heap of future visibility times per queue (durable
  timers, abandon delays) so a waiter wakes when the earliest known one is due. Worker-queue
  delays (only an unknown activity's backoff makes them) are known to this process alone; other
  processes find that work by their fallback poll.
* :class:`Listener` owns one non-pooled autocommit connection that LISTENs on the schema's
  channels. If the connection dies (``pg_terminate_backend``, a restart, a network cut) it
  reconnects by itself with jittered exponential backoff, and on every (re)connect wakes every
  waiter, since notifications sent while it was away are lost. A health query runs after a quiet
  period so a silently dead socket is noticed.

Payloads are tiny (``reference/reliability.md`` 4.4): ``<sender>:<body>``, where ``<sender>`` is a
random id of the sending provider object (a listener ignores its own notifications: its hub was
told directly) and ``<body>`` is, on the work channel, ``"w"`` (worker work now), ``"o"``
(orchestrator work now), ``"o@<ms>"`` (work now and a timer due at ``<ms>``) or ``"@<ms>"`` (only a
timer due at ``<ms>``); on the instance channel, the instance id.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import psycopg
from psycopg import sql

logger = logging.getLogger("perdure_postgres.wakeups")

QueueName = Literal["orchestrator", "worker"]

#: Longest instance id sent as a notification payload (PostgreSQL's limit is 8000 bytes).
MAX_NOTIFY_PAYLOAD = 4000
#: Bound on remembered timer deadlines; the earliest ones are kept.
MAX_TIMERS = 10_000


def _now_ms() -> int:
    return int(time.time() * 1000)


class _QueueSignal:
    """A generation counter and an event that is replaced every time it fires."""

    __slots__ = ("event", "gen", "seen")

    def __init__(self) -> None:
        self.gen = 0
        self.seen = 0
        self.event = asyncio.Event()

    def fire(self, *, work: bool) -> None:
        if work:
            self.gen += 1
        event, self.event = self.event, asyncio.Event()
        event.set()


class WakeHub:
    """In-process wake-up state shared by the listener, the provider and the waiters."""

    def __init__(self) -> None:
        self._queues: dict[QueueName, _QueueSignal] = {
            "orchestrator": _QueueSignal(),
            "worker": _QueueSignal(),
        }
        self._timers: dict[QueueName, list[int]] = {"orchestrator": [], "worker": []}
        self._instances: dict[str, _InstanceWait] = {}

    # -- producers -----------------------------------------------------------------------------

    def work(self, queue: QueueName) -> None:
        """Work may be available on ``queue`` now."""
        self._queues[queue].fire(work=True)

    def timer(self, at_ms: int, queue: QueueName = "orchestrator") -> None:
        """A message of ``queue`` becomes visible at ``at_ms`` (wall clock, milliseconds)."""
        if at_ms <= _now_ms():
            self.work(queue)
            return
        timers = self._timers[queue]
        earliest = timers[0] if timers else None
        heapq.heappush(timers, at_ms)
        if len(timers) > MAX_TIMERS:
            timers[:] = heapq.nsmallest(MAX_TIMERS // 2, timers)  # in place: waiters hold it
            heapq.heapify(timers)
        if earliest is None or at_ms < earliest:
            # Waiters recompute their deadline; this is not work, so they keep waiting.
            self._queues[queue].fire(work=False)

    def instance_changed(self, instance_id: str) -> None:
        """The stored state of ``instance_id`` may have changed."""
        waiting = self._instances.pop(instance_id, None)
        if waiting is not None:
            waiting.event.set()

    def everything(self) -> None:
        """Wake every waiter (after a listener reconnect: notifications may have been lost)."""
        for signal in self._queues.values():
            signal.fire(work=True)
        waits, self._instances = self._instances, {}
        for waiting in waits.values():
            waiting.event.set()

    def handle_payload(self, payload: str) -> None:
        """Apply one work-channel notification payload (see the module docstring)."""
        if payload == "w":
            self.work("worker")
            return
        now_part, _, at = payload.partition("@")
        if now_part == "o":
            self.work("orchestrator")
        if at:
            with contextlib.suppress(ValueError):
                self.timer(int(at))

    # -- consumers -----------------------------------------------------------------------------

    async def wait_for_work(self, queue: QueueName, timeout: float) -> None:
        """Return when work may have arrived on ``queue``, a known due time passed, or at ``timeout``.

        Work signalled since the previous return (by any caller) makes it return at once, so a
        notification that lands between a caller's empty fetch and its wait is not lost.
        """
        signal = self._queues[queue]
        if signal.gen != signal.seen:
            signal.seen = signal.gen
            return
        start_gen = signal.gen
        deadline = time.monotonic() + max(0.0, timeout)
        timers = self._timers[queue]
        while True:
            remaining = deadline - time.monotonic()
            if timers:
                now = _now_ms()
                if timers[0] <= now:
                    while timers and timers[0] <= now:
                        heapq.heappop(timers)
                    # Wake every other waiter too (several runtimes may share this provider
                    # object); this caller fetches now, so the signal is not left pending.
                    signal.fire(work=True)
                    signal.seen = signal.gen
                    return
                remaining = min(remaining, (timers[0] - now) / 1000.0)
            if remaining <= 0:
                return
            event = signal.event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
            if signal.gen != start_gen:
                signal.seen = signal.gen
                return

    async def wait_for_instance(self, instance_id: str, timeout: float) -> None:
        """Return when ``instance_id`` may have changed, or after ``timeout`` seconds."""
        waiting = self._instances.get(instance_id)
        if waiting is None:
            waiting = self._instances[instance_id] = _InstanceWait()
        waiting.count += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiting.event.wait(), max(0.0, timeout))
        finally:
            waiting.count -= 1
            if waiting.count == 0 and self._instances.get(instance_id) is waiting:
                # Nobody waits on it any more: forget it so the map does not grow.
                del self._instances[instance_id]


class _InstanceWait:
    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.count = 0


class Listener:
    """A self-healing LISTEN connection feeding a :class:`WakeHub`.

    ``on_work`` receives work-channel payloads, ``on_instance`` instance-channel payloads. The
    instance channel is listened to lazily (:meth:`want_instance_channel`), since only clients
    waiting on an instance need it.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        work_channel: str,
        instance_channel: str,
        hub: WakeHub,
        sender: str = "",
        connect_timeout: float = 5.0,
        tick: float = 0.25,
        health_interval: float = 5.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._work_channel = work_channel
        self._instance_channel = instance_channel
        self._hub = hub
        self._sender = sender
        self._connect_timeout = connect_timeout
        self._tick = tick
        self._health_interval = health_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._connect_kwargs = dict(connect_kwargs or {})
        self._wanted: set[str] = {work_channel}
        self._listening: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        #: Backend pid of the current LISTEN connection (for tests and diagnostics).
        self.backend_pid: int | None = None
        #: How many times a connection was established (1 after the first connect).
        self.connects = 0

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up and listening."""
        return self._connected.is_set()

    def listening_to(self, channel: str) -> bool:
        """True if the live connection is currently LISTENing on ``channel``."""
        return self.connected and channel in self._listening

    def want_instance_channel(self) -> None:
        """Start listening on the instance channel (takes effect within one tick)."""
        self._wanted.add(self._instance_channel)

    def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="perdure-postgres-listener")

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the listener is connected; False on timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.connected

    async def stop(self) -> None:
        """Stop the task and close the connection (idempotent)."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
        await self._close_conn()

    async def _close_conn(self) -> None:
        self._connected.clear()
        self._listening = frozenset()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _listen(self, conn: psycopg.AsyncConnection[Any], channels: set[str]) -> None:
        for channel in sorted(channels - self._listening):
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._listening = self._listening | {channel}

    async def _run(self) -> None:
        backoff = self._min_backoff
        while True:
            if self._closing:
                break
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout)),
                    **self._connect_kwargs,
                )
                self._conn = conn
                self.backend_pid = conn.info.backend_pid
                await self._listen(conn, self._wanted)
                self.connects += 1
                self._connected.set()
                backoff = self._min_backoff
                if self.connects > 1:
                    # Anything committed while we were not listening went unheard.
                    self._hub.everything()
                await self._pump(conn)
            except Exception as exc:
                raise_if_cancelling(exc)
                if not self._closing:
                    logger.warning("perdure-postgres listener connection lost (%s); reconnecting", exc)
            finally:
                await self._close_conn()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _pump(self, conn: psycopg.AsyncConnection[Any]) -> None:
        quiet = 0.0
        while not self._closing:
            if self._wanted - self._listening:
                await self._listen(conn, self._wanted)
            received = False
            async for notify in conn.notifies(timeout=self._tick):
                received = True
                sender, _, body = notify.payload.partition(":")
                if sender == self._sender:
                    continue  # our own commit: the hub was told directly, without a round trip
                if notify.channel == self._work_channel:
                    self._hub.handle_payload(body)
                elif notify.channel == self._instance_channel:
                    self._hub.instance_changed(body)
            if conn.closed or conn.broken:
                raise psycopg.OperationalError("listener connection closed")
            quiet = 0.0 if received else quiet + self._tick
            if quiet >= self._health_interval:
                quiet = 0.0
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self._connect_timeout)


class Notifier:
    """Sends the NOTIFYs of committed work, coalesced, one small statement at a time.

    The provider posts what each commit produced; a background task sends everything posted
    since its previous statement in one statement, so a busy process sends far fewer
    notifications than it commits transactions, and never from inside a durable write
    transaction (see ``_sql._NOTIFY``). Failures are logged and dropped: waiters then fall back
    to polling.
    """

    def __init__(
        self,
        send: Callable[[list[str], list[str]], Awaitable[None]],
        *,
        work_channel: str,
        instance_channel: str,
        sender: str = "",
        max_timers: int = 100,
    ) -> None:
        self._send = send
        self._sender = sender
        self._work_channel = work_channel
        self._instance_channel = instance_channel
        self._max_timers = max_timers
        self._worker = False
        self._orchestrator = False
        self._timers: set[int] = set()
        self._instances: set[str] = set()
        self._posted = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Statements sent (for tests and diagnostics).
        self.sent = 0

    def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="perdure-postgres-notifier")

    async def stop(self) -> None:
        """Send what is pending (briefly), then stop the task."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._pending():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.flushed(), 1.0)
        self._closing = True
        self._posted.set()
        await stop_task(task)

    def post(
        self,
        *,
        worker: bool = False,
        orchestrator_now: bool = False,
        timers: Iterable[int] = (),
        instances: Iterable[str] = (),
    ) -> None:
        """Record what a commit produced; the task notifies it soon."""
        self._worker |= worker
        self._orchestrator |= orchestrator_now
        self._timers.update(timers)
        self._instances.update(i for i in instances if len(i.encode()) <= MAX_NOTIFY_PAYLOAD)
        if self._pending():
            self._idle.clear()
            self._posted.set()

    async def flushed(self) -> None:
        """Wait until everything posted so far has been sent (or dropped after a failure)."""
        await self._idle.wait()

    def _pending(self) -> bool:
        return self._worker or self._orchestrator or bool(self._timers) or bool(self._instances)

    def _drain(self) -> tuple[list[str], list[str]]:
        timers = sorted(self._timers)[: self._max_timers]
        payloads = make_payloads(
            worker=self._worker,
            orchestrator_now=self._orchestrator,
            earliest_timer_ms=timers[0] if timers else None,
        )
        payloads.extend(f"@{at}" for at in timers[1:])
        channels = [self._work_channel] * len(payloads)
        channels.extend([self._instance_channel] * len(self._instances))
        payloads.extend(sorted(self._instances))
        payloads = [f"{self._sender}:{payload}" for payload in payloads]
        self._worker = self._orchestrator = False
        self._timers = set()
        self._instances = set()
        return channels, payloads

    async def _run(self) -> None:
        while True:
            await self._posted.wait()
            self._posted.clear()
            if self._closing:
                return
            channels, payloads = self._drain()
            if payloads:
                try:
                    await self._send(channels, payloads)
                    self.sent += 1
                except Exception as exc:
                    raise_if_cancelling(exc)
                    logger.debug("perdure-postgres: notification dropped (%s)", exc)
            if not self._pending():
                self._idle.set()


async def stop_task(task: asyncio.Task[Any], timeout: float = 2.0) -> None:
    """Cancel ``task`` and wait for it to end, without trusting one cancellation to land.

    On Python 3.11 ``asyncio.wait_for`` (used inside psycopg_pool) can swallow a cancellation
    that arrives just as its inner wait completes; the stopped tasks also watch a closing flag,
    and a cancellation is repeated until the task is gone.
    """
    for _ in range(5):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=timeout / 5)
    if not task.done():
        logger.warning("perdure-postgres: background task %s did not stop", task.get_name())
        return
    if not task.cancelled() and task.exception() is not None:
        logger.debug("perdure-postgres: background task %s ended with %r", task.get_name(), task.exception())


def raise_if_cancelling(exc: BaseException) -> None:
    """Re-raise a cancellation that a driver turned into an ordinary error.

    psycopg answers a cancelled wait by cancelling the query on the server, and what surfaces
    may be the server's error rather than :class:`asyncio.CancelledError`; swallowing it would
    leave a task that was asked to stop running forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


def channel_names(schema: str) -> tuple[str, str]:
    """The (work, instance) NOTIFY channel names for ``schema`` (each at most 63 bytes)."""
    import zlib

    base = f"perdure.{schema}"
    if len(base) > 58:
        base = f"perdure.{schema[:40]}.{zlib.crc32(schema.encode()):08x}"
    return f"{base}:w", f"{base}:i"


def make_payloads(*, worker: bool, orchestrator_now: bool, earliest_timer_ms: int | None) -> list[str]:
    """The coalesced work-channel payloads for one transaction (at most one per queue)."""
    payloads: list[str] = []
    if worker:
        payloads.append("w")
    if orchestrator_now and earliest_timer_ms is not None:
        payloads.append(f"o@{earliest_timer_ms}")
    elif orchestrator_now:
        payloads.append("o")
    elif earliest_timer_ms is not None:
        payloads.append(f"@{earliest_timer_ms}")
    return payloads


__all__ = ["Listener", "Notifier", "WakeHub", "channel_names", "make_payloads", "raise_if_cancelling"]
