"""The connection thread: one thread owns the SQLite connection and group-commits writes.

Coroutines submit *jobs* (a list of *units*, each a function of the connection) and await a
future. The thread takes every job queued at that moment and runs:

* read jobs first, each unit on its own (autocommit reads, never blocked by a writer in WAL);
* then all write jobs inside ONE ``BEGIN IMMEDIATE`` transaction, each unit inside its own
  ``SAVEPOINT``: a unit that raises rolls back only itself and reports its error, the others
  commit together with a single fsync (group commit).

WAL checkpoints (copying committed pages into the database file, with an fsync of that file)
run on a second connection in a background :class:`Checkpointer` thread, so that a commit only
ever pays for appending to the WAL and its own fsync.

A busy database (another process holds the write lock) is retried with backoff for
``busy_retry_limit`` seconds before the batch fails with a retryable error. Units append *effects*
(wake-ups) to a list; the effects of units that committed are handed to ``on_commit`` after the
commit, before the callers are answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from perdure_sqlite._errors import BusyTimeout, is_busy, is_transaction_fatal

#: A unit of work: ``fn(connection, effects, *args)`` runs on the connection thread.
Unit = tuple[Callable[..., Any], tuple[Any, ...]]
#: Effects recorded by units (interpreted by the provider after a commit).
Effects = list[tuple[Any, ...]]

#: Job kinds. READ runs outside any transaction. DURABLE writes must survive power loss once
#: answered (enqueues, turn acks, with the leases they take): their commit fsyncs the WAL (with
#: durability "full"). LIGHT writes only move leases, locks and visibility (fetch, renew,
#: abandon) or complete an activity (its ack, with the instance lock it may take): losing the
#: last of them to a power cut is harmless (a lease or lock is simply taken again, an activity
#: runs again), so a batch of only LIGHT jobs commits without an fsync. The next durable
#: commit's fsync covers their frames too: the WAL is appended in order, so nothing after an
#: fsync can survive while something before it is lost.
READ = 0
LIGHT = 1
DURABLE = 2

#: Upper bound on jobs per transaction, to bound the latency of the first job in a batch.
_MAX_JOBS_PER_BATCH = 512
_STOP = object()


class Job:
    """Units to run on the connection thread and the future that receives their outcomes.

    The outcome list holds, per unit and in order, its return value or the exception it raised.
    """

    __slots__ = ("future", "kind", "loop", "units")

    def __init__(
        self,
        kind: int,
        units: Sequence[Unit],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[list[Any]],
    ) -> None:
        self.kind = kind
        self.units = units
        self.loop = loop
        self.future = future


def _resolve(answers: list[tuple[asyncio.Future[list[Any]], list[Any]]]) -> None:
    for future, outcome in answers:
        if not future.done():
            future.set_result(outcome)


class Checkpointer:
    """Checkpoints the WAL from its own connection and thread, at most every ``interval`` seconds.

    SQLite's default makes the committing connection checkpoint every 1000 WAL pages, which
    stalls that commit while the database file is written and fsynced (in our measurements the
    mean commit took 2 ms instead of 0.4 ms). Here the writer's ``wal_autocheckpoint`` is
    raised to a safety limit and ``poke`` after each commit asks this thread for a PASSIVE
    checkpoint: it never blocks the writer or readers, and copies most frames so that the
    writer's rare own checkpoint is short.
    """

    def __init__(
        self, *, name: str, connect: Callable[[], sqlite3.Connection], interval: float = 0.05
    ) -> None:
        self._connect = connect
        self._interval = interval
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        """Start checkpointing in the background."""
        self._thread.start()

    def poke(self) -> None:
        """Ask for a checkpoint soon (new frames were committed)."""
        self._wanted.set()

    def stop(self) -> None:
        """Stop and wait for the thread (after at most one last checkpoint)."""
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _main(self) -> None:
        try:
            connection = self._connect()
        except Exception:  # no checkpointer: the writer checkpoints by itself past its limit
            return
        try:
            while True:
                self._wanted.wait()
                if self._stopping:
                    return
                self._wanted.clear()
                with contextlib.suppress(sqlite3.Error):  # busy or I/O trouble: try again later
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                time.sleep(self._interval)
        finally:
            connection.close()


class ConnectionThread:
    """Owns one ``sqlite3.Connection`` on a dedicated thread and runs submitted jobs on it."""

    def __init__(
        self,
        *,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        on_commit: Callable[[Effects], None],
        busy_retry_limit: float,
        checkpointer: Checkpointer | None = None,
        full_sync: bool = False,
    ) -> None:
        self._connect = connect
        self._checkpointer = checkpointer
        #: With durability "full": durable batches commit with synchronous=FULL, light ones
        #: with NORMAL. ``_synchronous_full`` is the connection's current setting.
        self._full_sync = full_sync
        self._synchronous_full = full_sync
        self._on_commit = on_commit
        self._busy_retry_limit = busy_retry_limit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopping = False
        #: Counters for tests and benchmarks: committed write transactions and the jobs they held.
        self.transactions = 0
        self.write_jobs = 0
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Daemon: an application that forgets close() must still be able to exit. Everything
        # acknowledged is already committed, so stopping mid-batch loses nothing acknowledged.
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; ``ready`` resolves once the connection is open and migrated."""
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False if the thread is stopping (the job will never run)."""
        with self._lock:
            if self._stopping:
                return False
            self._queue.put(job)
            return True

    def stop(self) -> concurrent.futures.Future[None]:
        """Finish the jobs already queued, close the connection and end the thread."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._queue.put(_STOP)
        return self.stopped

    # -- the thread ----------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            connection = self._open()
        except BaseException as exc:
            with self._lock:
                self._stopping = True
            self.ready.set_exception(exc)
            self.stopped.set_result(None)
            return
        if self._checkpointer is not None:
            self._checkpointer.start()
        self.ready.set_result(None)
        try:
            self._serve(connection)
        finally:
            try:
                if self._checkpointer is not None:
                    self._checkpointer.stop()
                connection.close()
            finally:
                self.stopped.set_result(None)

    def _open(self) -> sqlite3.Connection:
        deadline = time.monotonic() + self._busy_retry_limit
        pause = 0.005
        while True:
            try:
                return self._connect()
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _serve(self, connection: sqlite3.Connection) -> None:
        jobs_queue = self._queue
        while True:
            first = jobs_queue.get()
            if first is _STOP:
                return
            batch: list[Job] = [first]
            stop = False
            while len(batch) < _MAX_JOBS_PER_BATCH:
                try:
                    job = jobs_queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            try:
                self._run_batch(connection, batch)
            except BaseException as exc:  # a bug, or an interrupt: fail the batch, keep serving
                if connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                self._answer([(job, [exc] * len(job.units)) for job in batch])
            if stop:
                return

    def _run_batch(self, connection: sqlite3.Connection, batch: list[Job]) -> None:
        answers: list[tuple[Job, list[Any]]] = []
        writes: list[Job] = []
        for job in batch:
            if job.kind != READ:
                writes.append(job)
            else:
                answers.append((job, [self._read(connection, fn, args) for fn, args in job.units]))
        if writes:
            outcomes, effects = self._write(connection, writes)
            if effects:
                with contextlib.suppress(Exception):  # wake-ups are best effort; the work is committed
                    self._on_commit(effects)
            answers.extend(zip(writes, outcomes, strict=True))
        self._answer(answers)

    def _answer(self, answers: list[tuple[Job, list[Any]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[Any]], list[Any]]]] = {}
        for job, outcome in answers:
            by_loop.setdefault(job.loop, []).append((job.future, outcome))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, items)

    def _read(self, connection: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        deadline: float | None = None
        pause = 0.002
        while True:
            try:
                return fn(connection, None, *args)
            except Exception as exc:
                if not is_busy(exc):
                    return exc
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._busy_retry_limit
                if now + pause > deadline:
                    return self._busy_error()
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _busy_error(self) -> BusyTimeout:
        return BusyTimeout(
            f"the database stayed locked by another connection for {self._busy_retry_limit:g}s"
        )

    def _write(self, connection: sqlite3.Connection, jobs: list[Job]) -> tuple[list[list[Any]], Effects]:
        """Run ``jobs`` in one transaction; retry the whole batch while the database is busy."""
        deadline: float | None = None
        pause = 0.002
        while True:
            result = self._attempt(connection, jobs)
            if result is not None:
                return result
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + self._busy_retry_limit
            if now + pause > deadline:
                error = self._busy_error()
                return [[error] * len(job.units) for job in jobs], []
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    def _attempt(
        self, connection: sqlite3.Connection, jobs: list[Job]
    ) -> tuple[list[list[Any]], Effects] | None:
        """One try at the batch: outcomes and effects, or None if the database was busy."""
        execute = connection.execute
        if self._full_sync:
            durable = any(job.kind == DURABLE for job in jobs)
            if durable != self._synchronous_full:
                execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                self._synchronous_full = durable
        try:
            execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if is_busy(exc):
                return None
            return [[exc] * len(job.units) for job in jobs], []
        effects: Effects = []
        outcomes: list[list[Any]] = []
        try:
            for job in jobs:
                outcome: list[Any] = []
                for fn, args in job.units:
                    mark = len(effects)
                    execute("SAVEPOINT unit")
                    try:
                        value = fn(connection, effects, *args)
                    except Exception as exc:
                        if is_busy(exc) or is_transaction_fatal(exc) or not connection.in_transaction:
                            raise
                        del effects[mark:]
                        execute("ROLLBACK TO unit")
                        execute("RELEASE unit")
                        outcome.append(exc)
                    else:
                        execute("RELEASE unit")
                        outcome.append(value)
                outcomes.append(outcome)
            execute("COMMIT")
            self.transactions += 1
            self.write_jobs += len(jobs)
            if self._checkpointer is not None:
                self._checkpointer.poke()
        except Exception as exc:
            if connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    execute("ROLLBACK")
            if is_busy(exc):
                return None
            return [[exc] * len(job.units) for job in jobs], []
        return outcomes, effects
