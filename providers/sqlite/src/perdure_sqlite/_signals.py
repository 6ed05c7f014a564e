"""In-process wake-ups: dispatchers sleep until this provider object produces work for them.

The connection thread calls the producer side (``arrived``, ``due``, ``changed``) after a commit;
waiters live on any number of event loops and are woken with ``call_soon_threadsafe``. All state
is guarded by a ``threading.Lock`` because producers and waiters run on different threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections.abc import Iterable

#: At most this many future due times are remembered per queue; beyond it the runtime's
#: fallback poll covers the rest (a late wake-up costs latency, never correctness).
_MAX_DUE = 10_000


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake(waiters: Iterable[asyncio.Future[None]]) -> None:
    for future in waiters:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            future.get_loop().call_soon_threadsafe(_set_done, future)


async def _sleep_on(future: asyncio.Future[None], seconds: float) -> None:
    """Wait for ``future`` at most ``seconds``, without cancelling anything when time is up."""
    if seconds <= 0:
        return
    loop = asyncio.get_running_loop()
    handle = loop.call_later(seconds, _set_done, future)
    try:
        await future
    finally:
        handle.cancel()


class WorkSignal:
    """Wake-ups for one queue: work that is visible now, and the times future work becomes due.

    Work wakes every waiter, not just one: several runtimes may share this provider object, and
    the one that happens to look first may lack the activity. A generation counter says that
    work came (it arrived, or a due time passed) while a waiter slept, even when several waiters'
    sleeps end at the same instant. ``arrived`` also leaves a sticky flag so that work produced
    while nobody waits (the dispatcher is busy fetching) makes the next wait return at once
    instead of sleeping a full poll interval.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = False
        self._generation = 0
        self._due: list[int] = []
        self._waiters: list[asyncio.Future[None]] = []

    def arrived(self) -> None:
        """Work became visible now."""
        with self._lock:
            self._pending = True
            self._generation += 1
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def due(self, at_ms: int) -> None:
        """Work becomes visible at ``at_ms`` (a timer, an abandon delay)."""
        with self._lock:
            earliest = self._due[0] if self._due else None
            if len(self._due) < _MAX_DUE:
                heapq.heappush(self._due, at_ms)
            if earliest is not None and earliest <= at_ms:
                return
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def reset_due(self, at_ms: int | None) -> None:
        """Replace the known due times by the store's own answer (the earliest future message)."""
        with self._lock:
            earliest = self._due[0] if self._due else None
            self._due = [] if at_ms is None else [at_ms]
            if at_ms is None or (earliest is not None and earliest <= at_ms):
                return
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    def wake_all(self) -> None:
        """Wake every waiter (used on close)."""
        with self._lock:
            self._pending = True
            waiters, self._waiters = self._waiters, []
        _wake(waiters)

    async def wait(self, seconds: float) -> None:
        """Return when work arrived or came due, or after ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        generation: int | None = None
        while True:
            came_due: list[asyncio.Future[None]] | None = None
            with self._lock:
                if generation is None:
                    generation = self._generation
                if self._pending or self._generation != generation:
                    self._pending = False
                    return
                now_ms = time.time() * 1000.0
                if self._due and self._due[0] <= now_ms:
                    while self._due and self._due[0] <= now_ms:
                        heapq.heappop(self._due)
                    self._generation += 1
                    came_due, self._waiters = self._waiters, []
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return
                    if self._due:
                        remaining = min(remaining, (self._due[0] - now_ms) / 1000.0)
                    future: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(future)
            if came_due is not None:
                _wake(came_due)  # the others race for it too
                return
            try:
                await _sleep_on(future, remaining)
            finally:
                with self._lock:
                    if future in self._waiters:
                        self._waiters.remove(future)


class _Watched:
    __slots__ = ("seen", "version", "waiters")

    def __init__(self) -> None:
        self.version = 0
        self.seen = 0
        self.waiters: list[asyncio.Future[None]] = []


class InstanceWatch:
    """Per-instance change notifications for clients waiting on an orchestration.

    An instance is watched once it has been read through this provider (or waited on). Reads
    record the change version they saw, so a change committed between a client's read and its
    wait makes the wait return at once instead of being missed. At most ``capacity`` idle
    instances are remembered (least recently used are forgotten first).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._entries: dict[str, _Watched] = {}

    def _entry(self, instance_id: str) -> _Watched:
        entry = self._entries.pop(instance_id, None)
        if entry is None:
            entry = _Watched()
            if len(self._entries) >= self._capacity:
                self._evict()
        self._entries[instance_id] = entry  # most recently used last
        return entry

    def _evict(self) -> None:
        idle = [key for key, entry in self._entries.items() if not entry.waiters]
        for key in idle[: max(1, len(idle) // 2)]:
            del self._entries[key]

    def observed(self, instance_id: str) -> None:
        """Record that a read of the instance's state was served (on the connection thread)."""
        with self._lock:
            entry = self._entry(instance_id)
            entry.seen = entry.version

    def changed(self, instance_ids: Iterable[str]) -> None:
        """Wake the waiters of instances a commit touched (on the connection thread)."""
        woken: list[asyncio.Future[None]] = []
        with self._lock:
            for instance_id in instance_ids:
                entry = self._entries.get(instance_id)
                if entry is not None:
                    entry.version += 1
                    woken.extend(entry.waiters)
                    entry.waiters.clear()
        if woken:
            _wake(woken)

    def wake_all(self) -> None:
        """Wake every waiter (used on close)."""
        with self._lock:
            woken = [future for entry in self._entries.values() for future in entry.waiters]
            for entry in self._entries.values():
                entry.waiters.clear()
        _wake(woken)

    async def wait(self, instance_id: str, seconds: float) -> None:
        """Return when the instance changed since it was last read, or after ``seconds``."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entry(instance_id)
            if entry.version != entry.seen:
                entry.seen = entry.version
                return
            future: asyncio.Future[None] = loop.create_future()
            entry.waiters.append(future)
        try:
            await _sleep_on(future, seconds)
        finally:
            with self._lock:
                if future in entry.waiters:
                    entry.waiters.remove(future)
                entry.seen = entry.version
