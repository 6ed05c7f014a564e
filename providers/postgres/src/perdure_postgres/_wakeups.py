"""Wake-ups: LISTEN/NOTIFY on a dedicated connection, plus local signals and timer deadlines.

Notifications are hints, never the source of truth: a lost one costs latency (the runtime keeps a
fallback poll), never correctness. The pieces:

* :class:`WakeHub` is what ``wait_for_work`` and ``wait_for_instance_change`` wait on. It is fed
  by the listener (other processes' commits), directly by the provider after its own commits (no
  round trip through the server), and by a heap of future visibility times (durable timers) so a
  waiter wakes when the earliest known timer is due.
* :class:`Listener` owns one non-pooled autocommit connection that LISTENs on the schema's
  channels. If the connection dies (``pg_terminate_backend``, a restart, a network cut) it
  reconnects by itself with jittered exponential backoff, and on every (re)connect wakes every
  waiter, since notifications sent while it was away are lost. A health query runs after a quiet
  period so a silently dead socket is noticed.

Payloads are tiny (``reference/reliability.md`` 4.4): on the work channel ``"w"`` (worker work
now), ``"o"`` (orchestrator work now), ``"o@<ms>"`` (work now and a timer due at ``<ms>``),
``"@<ms>"`` (only a timer due at ``<ms>``); on the instance channel, the instance id.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
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
        self._timers: list[int] = []
        self._instances: dict[str, _InstanceWait] = {}

    # -- producers -----------------------------------------------------------------------------

    def work(self, queue: QueueName) -> None:
        """Work may be available on ``queue`` now."""
        self._queues[queue].fire(work=True)

    def timer(self, at_ms: int) -> None:
        """An orchestrator message becomes visible at ``at_ms`` (wall clock, milliseconds)."""
        if at_ms <= _now_ms():
            self.work("orchestrator")
            return
        earliest = self._timers[0] if self._timers else None
        heapq.heappush(self._timers, at_ms)
        if len(self._timers) > MAX_TIMERS:
            self._timers = heapq.nsmallest(MAX_TIMERS // 2, self._timers)
            heapq.heapify(self._timers)
        if earliest is None or at_ms < earliest:
            # Waiters recompute their deadline; this is not work, so they keep waiting.
            self._queues["orchestrator"].fire(work=False)

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
        """Return when work may have arrived on ``queue``, a known timer is due, or at ``timeout``.

        Work signalled since the previous return (by any caller) makes it return at once, so a
        notification that lands between a caller's empty fetch and its wait is not lost.
        """
        signal = self._queues[queue]
        if signal.gen != signal.seen:
            signal.seen = signal.gen
            return
        start_gen = signal.gen
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining = deadline - time.monotonic()
            if queue == "orchestrator" and self._timers:
                now = _now_ms()
                if self._timers[0] <= now:
                    while self._timers and self._timers[0] <= now:
                        heapq.heappop(self._timers)
                    return
                remaining = min(remaining, (self._timers[0] - now) / 1000.0)
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
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
            except asyncio.CancelledError:
                raise
            except Exception as exc:
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
                if notify.channel == self._work_channel:
                    self._hub.handle_payload(notify.payload)
                elif notify.channel == self._instance_channel:
                    self._hub.instance_changed(notify.payload)
            if conn.closed or conn.broken:
                raise psycopg.OperationalError("listener connection closed")
            quiet = 0.0 if received else quiet + self._tick
            if quiet >= self._health_interval:
                quiet = 0.0
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self._connect_timeout)


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


__all__ = ["Listener", "WakeHub", "channel_names", "make_payloads"]
