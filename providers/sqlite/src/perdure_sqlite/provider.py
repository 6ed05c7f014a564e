"""``SqliteProvider``: the embedded perdure provider, one SQLite file (or ``:memory:``).

One dedicated thread owns the connection (see :mod:`perdure_sqlite._thread`); coroutines encode
JSON, submit units of SQL to it and decode what comes back, so the event loop never blocks on
SQLite and the thread's write transactions stay short. Every write queued at the same moment
commits in one transaction with one fsync (group commit); each runs in its own savepoint, so one
failing ack never affects the others.

Direct dispatch is supported: a turn's ack can insert the activities it schedules already leased
to its caller, and an activity's ack can lock the instance its result is for. Both take the very
locks and leases a fetch takes (same SQL, same tokens), inside the ack's own savepoint. A turn's
ack can also keep its instance locked (``keep_lock``) and delete the work items whose results it
applied in memory (``completed_work_items``), so a chain of short activities run by one runtime
commits one transaction per step.

An ack that releases an instance (or would keep it) while messages that arrived during its lock
are visible wakes the orchestrator waiters: those told of the messages found the instance locked
and went back to sleep, and would otherwise wait a whole poll interval.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sqlite3
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from perdure.history import (
    ActivityExecute,
    ActivityRef,
    DecodeError,
    Event,
    Message,
    decode_event,
    decode_message,
)
from perdure.history import encode_event as _encode_event
from perdure.history import encode_message as _encode_message
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
from perdure_sqlite import _store
from perdure_sqlite._errors import as_provider_error, closed_error
from perdure_sqlite._schema import MEMORY, Durability, check_schema, connect, upgrade
from perdure_sqlite._signals import InstanceWatch, WorkSignal
from perdure_sqlite._thread import DURABLE, LIGHT, READ, Checkpointer, ConnectionThread, Effects, Job, Unit

#: What perdure-sqlite promises to store per payload (input, result, event data). SQLite itself
#: accepts values up to SQLITE_MAX_LENGTH (1 GB by default); 16 MiB is the size we test and that
#: keeps one history row from stalling the single writer.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def _instance(row: tuple[Any, ...] | None) -> InstanceInfo | None:
    return None if row is None else InstanceInfo(*row)


def _orchestration_item(locked: _store.LockedItem) -> OrchestrationItem:
    """Decode what a lock tagged (by a fetch or a direct lock); bad messages are reported, not raised."""
    instance_id, token, rows, instance_row = locked
    messages: list[Message] = []
    bad: list[str] = []
    attempts = 0
    for row_id, payload, attempt_count in rows:
        attempts = max(attempts, attempt_count)
        try:
            message = decode_message(payload)
        except Exception as exc:  # any undecodable message is reported, never raised
            bad.append(f"message {row_id}: {exc}")
            continue
        if isinstance(message, ActivityExecute):
            bad.append(f"message {row_id}: an ActivityExecute does not belong on the orchestrator queue")
            continue
        messages.append(message)
    return OrchestrationItem(instance_id, token, attempts, messages, _instance(instance_row), bad)


class SqliteProvider(Provider):
    """A perdure provider storing everything in one SQLite database.

    :param path: the database file (created if missing), or ``":memory:"`` for a private
        in-memory database that lives as long as the provider (nothing is durable).
    :param durability: ``"full"`` (default) sets ``synchronous=FULL``: the WAL is fsynced at
        every commit that carries an enqueue or a turn's ack (leases it takes, a lock it keeps and
        work items it consumes included), so an acknowledged enqueue or turn survives power loss.
        Commits of only fetches, renewals, abandons and activity acks (with the instance lock one
        may take) skip the fsync: losing them to a power cut only means a lease or lock is taken
        again or an activity runs again (activities are at-least-once), and the next durable
        commit's fsync covers them, so no turn survives while a result it consumed is lost.
        ``"fast"`` sets ``synchronous=NORMAL``: commits survive a crash of the process, but the
        last transactions may be lost on power loss or an OS crash (the database stays
        consistent); commits are several times cheaper.
    :param migrate: run the alembic migrations on open (default). With ``False`` the schema must
        already be current, otherwise :meth:`open` fails with a permanent error saying how to
        migrate (:func:`perdure_sqlite.migrate`).
    :param busy_timeout: seconds SQLite's busy handler waits for a lock held by another
        connection before a statement reports SQLITE_BUSY.
    :param busy_retry_limit: seconds during which a busy database is retried (with backoff)
        before an operation fails with a retryable :class:`~perdure.provider.ProviderError`.

    Several processes may share a database file (WAL mode); wake-ups only reach dispatchers in
    the process that produced the work, the others find it on their fallback poll.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        migrate: bool = True,
        busy_timeout: float = 5.0,
        busy_retry_limit: float = 60.0,
    ) -> None:
        if durability not in ("full", "fast"):
            raise ValueError(f"durability must be 'full' or 'fast', not {durability!r}")
        self._path = os.fspath(path)
        if not self._path:
            raise ValueError("path must be a file name or ':memory:'")
        self._durability: Durability = durability
        self._migrate = migrate
        self._busy_timeout = busy_timeout
        self._busy_retry_limit = busy_retry_limit
        #: The connection thread, from the first open() on (maybe still starting).
        self._db: ConnectionThread | None = None
        #: The same thread once its connection is open and migrated: the hot path's only check.
        self._live: ConnectionThread | None = None
        self._closed = False
        self._token_base = secrets.token_hex(6)
        self._counter = itertools.count(1)
        self._orchestrator_signal = WorkSignal()
        self._worker_signal = WorkSignal()
        self._watch = InstanceWatch()

    def __repr__(self) -> str:
        return f"SqliteProvider({self._path!r}, durability={self._durability!r})"

    @property
    def path(self) -> str:
        """The database file, or ``":memory:"``."""
        return self._path

    @property
    def durability(self) -> Durability:
        """``"full"`` (synchronous=FULL) or ``"fast"`` (synchronous=NORMAL)."""
        return self._durability

    @property
    def capabilities(self) -> Capabilities:
        """In-process wake-ups and direct dispatch; a file may be shared by several processes."""
        return Capabilities(
            wakeups=True,
            cross_process=False,
            multi_process=self._path != MEMORY,
            ordered_calls=True,
            direct_dispatch=True,
            max_payload_bytes=MAX_PAYLOAD_BYTES,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> SqliteProvider:
        await self.open()
        return self

    async def open(self) -> None:
        """Start the connection thread, open the database and migrate it (unless disabled)."""
        if self._closed:
            raise closed_error("open")
        db = self._db
        if db is None:
            name = f"perdure-sqlite:{os.path.basename(self._path)}"
            checkpointer = None
            if self._path != MEMORY:
                checkpointer = Checkpointer(name=f"{name}:checkpoint", connect=self._connect_checkpointer)
            db = self._db = ConnectionThread(
                name=name,
                connect=self._connect,
                on_commit=self._on_commit,
                busy_retry_limit=self._busy_retry_limit,
                checkpointer=checkpointer,
                full_sync=self._durability == "full" and self._path != MEMORY,
            )
            db.start()
            weakref.finalize(self, db.stop)
        try:
            await asyncio.shield(asyncio.wrap_future(db.ready))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._db is db:
                self._db = None
            raise as_provider_error("open", exc) from exc
        if self._db is db:
            self._live = db

    async def close(self) -> None:
        """Finish queued operations, close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        db, self._db, self._live = self._db, None, None
        if db is not None:
            await asyncio.shield(asyncio.wrap_future(db.stop()))
        self._orchestrator_signal.wake_all()
        self._worker_signal.wake_all()
        self._watch.wake_all()

    def _connect(self) -> sqlite3.Connection:
        """Connect, then migrate or check the schema (on the connection thread)."""
        connection = connect(self._path, durability=self._durability, busy_timeout=self._busy_timeout)
        try:
            if self._migrate:
                upgrade(connection)
            else:
                check_schema(connection, self._path)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_checkpointer(self) -> sqlite3.Connection:
        """Open the checkpointer's connection (same durability, so checkpoints fsync alike)."""
        return connect(self._path, durability=self._durability, busy_timeout=self._busy_timeout)

    # -- plumbing ----------------------------------------------------------------------------

    async def _submit(self, operation: str, kind: int, units: Sequence[Unit]) -> list[Any]:
        db = self._live
        if db is None:
            if self._closed:
                raise closed_error(operation)
            await self.open()  # the first call opens lazily
            db = self._live
            if db is None:
                raise closed_error(operation)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not db.submit(Job(kind, units, loop, future)):
            raise closed_error(operation)
        return await future

    async def _call(self, operation: str, kind: int, fn: Callable[..., Any], *args: Any) -> Any:
        outcome = (await self._submit(operation, kind, [(fn, args)]))[0]
        if isinstance(outcome, BaseException):
            raise as_provider_error(operation, outcome) from outcome
        return outcome

    def _on_commit(self, effects: Effects) -> None:
        """Wake whoever waits for the work a commit produced (on the connection thread)."""
        orchestrator_ready = worker_ready = False
        changed: list[str] = []
        for effect in effects:
            kind = effect[0]
            if kind == _store.FX_INSTANCE:
                changed.append(effect[1])
            elif kind == _store.FX_ORCH_NEXT_DUE:
                self._orchestrator_signal.reset_due(effect[1])
            elif kind == _store.FX_ORCH:
                orchestrator_ready = orchestrator_ready or effect[1]
                if effect[2] is not None:
                    self._orchestrator_signal.due(effect[2])
            else:
                worker_ready = worker_ready or effect[1]
                if effect[2] is not None:
                    self._worker_signal.due(effect[2])
        if orchestrator_ready:
            self._orchestrator_signal.arrived()
        if worker_ready:
            self._worker_signal.arrived()
        if changed:
            self._watch.changed(changed)

    def _next_prefix(self, kind: str) -> str:
        """Return a token prefix unique to one fetch (random per provider object, then a counter)."""
        return f"{kind}{self._token_base}.{next(self._counter)}."

    @staticmethod
    def _orchestrator_rows(
        messages: Sequence[Message], now: int
    ) -> tuple[list[tuple[Any, ...]], tuple[bool, int | None]]:
        """Queue rows for ``messages`` and the wake-up they call for (ready now, earliest later)."""
        rows: list[tuple[Any, ...]] = []
        ready = False
        earliest: int | None = None
        for message in messages:
            at = message.visible_at_ms
            if at is None or at <= now:
                ready = True
                if at is None:
                    at = now
            elif earliest is None or at < earliest:
                earliest = at
            rows.append((message.instance_id, _encode_message(message), at, now))
        return rows, (ready, earliest)

    def _prepare_ack(self, ack: OrchestrationAck, now: int) -> _store.AckArgs:
        instance_id = ack.instance_id
        execution_id = ack.execution_id
        history: Sequence[Event] = ack.history
        orchestrator_rows, orchestrator_wake = self._orchestrator_rows(ack.orchestrator_items, now)
        work: Sequence[ActivityExecute] = ack.worker_items
        leased: Sequence[ActivityExecute] = ()
        if ack.lease_worker_items > 0 and work:
            leased, work = work[: ack.lease_worker_items], work[ack.lease_worker_items :]
            if ack.cancelled_activities:
                cancelled = set(ack.cancelled_activities)
                if any(
                    ActivityRef(i.instance_id, i.execution_id, i.activity_id) in cancelled for i in leased
                ):
                    raise ValueError("an activity leased by the ack is also cancelled by it")
        completed_work: list[tuple[int, str]] = []
        if ack.completed_work_items:
            # A malformed token is a lease that is not held: the ack fails before touching anything.
            completed_work = [
                (_store.row_of_token("ack_orchestration_items", token), token)
                for token in dict.fromkeys(ack.completed_work_items)
            ]
        self_visible_at_ms: int | None = None
        if ack.keep_lock is not None and orchestrator_rows:
            self_visible_at_ms = min(
                (row[2] for row in orchestrator_rows if row[0] == instance_id), default=None
            )
        return _store.AckArgs(
            instance_id=instance_id,
            lock_token=ack.lock_token,
            execution_id=execution_id,
            name=ack.name,
            version=ack.version,
            parent_instance_id=None if ack.parent is None else ack.parent.instance_id,
            status=ack.status,
            output=ack.output,
            custom_status_changed=ack.custom_status_changed,
            custom_status=ack.custom_status,
            max_event_id=max((event.event_id for event in history), default=0),
            history=[
                (instance_id, execution_id, event.event_id, event.TYPE, _encode_event(event))
                for event in history
            ],
            leased_rows=[
                (item.instance_id, item.execution_id, item.activity_id, _encode_message(item))
                for item in leased
            ],
            lease_prefix=self._next_prefix("w") if leased else "",
            lease_ms=_ms(ack.worker_lease_timeout),
            worker_rows=[
                (item.instance_id, item.execution_id, item.activity_id, _encode_message(item), now, now)
                for item in work
            ],
            orchestrator_rows=orchestrator_rows,
            orchestrator_wake=orchestrator_wake,
            self_visible_at_ms=self_visible_at_ms,
            cancelled=[
                (ref.instance_id, ref.execution_id, ref.activity_id) for ref in ack.cancelled_activities
            ],
            keep_ms=None if ack.keep_lock is None else _ms(ack.keep_lock),
            completed_work=completed_work,
        )

    async def _call_each(
        self, operation: str, prepared: list[Unit | ProviderError], kind: int = DURABLE
    ) -> list[Any]:
        """Run independent units in one job; per unit its return value or its error, in order."""
        units = [unit for unit in prepared if not isinstance(unit, ProviderError)]
        outcomes = iter(await self._submit(operation, kind, units) if units else [])
        results: list[Any] = []
        for unit in prepared:
            if isinstance(unit, ProviderError):
                results.append(unit)
                continue
            outcome = next(outcomes)
            results.append(
                as_provider_error(operation, outcome) if isinstance(outcome, BaseException) else outcome
            )
        return results

    # -- orchestrator queue ------------------------------------------------------------------

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """Lock up to ``limit`` ready instances (oldest visible message first) with their messages."""
        if limit <= 0:
            return []
        raw = await self._call(
            "fetch_orchestration_items",
            LIGHT,
            _store.fetch_orchestration,
            limit,
            _ms(lock_timeout),
            self._next_prefix("o"),
        )
        return [_orchestration_item(locked) for locked in raw]

    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """Commit each turn atomically, all in one transaction; one failing ack never affects another.

        An ack with ``lease_worker_items`` gets the leases of the items inserted already leased.
        One with ``keep_lock`` keeps its lock unless a visible message of the instance is waiting
        (then it is released, and the waiters woken); one with ``completed_work_items`` deletes
        those leased items and fails, changing nothing, if any of the leases is not held.
        """
        now = _store.now_ms()
        prepared: list[Unit | ProviderError] = []
        leasing = False
        for ack in acks:
            try:
                prepared.append((_store.ack_orchestration, (self._prepare_ack(ack, now),)))
                leasing = leasing or ack.lease_worker_items > 0
            except Exception as exc:
                prepared.append(as_provider_error("ack_orchestration_items", exc))
        results = await self._call_each("ack_orchestration_items", prepared)
        if leasing:
            for n, (ack, tokens) in enumerate(zip(acks, results, strict=True)):
                if ack.lease_worker_items > 0 and not isinstance(tokens, ProviderError):
                    results[n] = [
                        WorkItemLease(token, 1, ActivityRef(i.instance_id, i.execution_id, i.activity_id), i)
                        for token, i in zip(tokens or (), ack.worker_items, strict=False)
                    ]
        return results

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release an instance lock without committing (see the contract)."""
        await self._call(
            "abandon_orchestration_item",
            LIGHT,
            _store.abandon_orchestration,
            lock_token,
            _ms(delay),
            bool(ignore_attempt),
        )

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """Extend a held instance lock to ``lock_timeout`` seconds from now."""
        await self._call(
            "renew_orchestration_lock", LIGHT, _store.renew_orchestration, lock_token, _ms(lock_timeout)
        )

    # -- worker queue ------------------------------------------------------------------------

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """Lease up to ``limit`` visible activity items, oldest first."""
        if limit <= 0:
            return []
        prefix = self._next_prefix("w")
        rows = await self._call(
            "fetch_work_items", LIGHT, _store.fetch_work, limit, _ms(lock_timeout), prefix
        )
        leases: list[WorkItemLease] = []
        for row_id, instance_id, execution_id, activity_id, payload, attempt_count in rows:
            token = f"{prefix}{row_id}"
            ref = ActivityRef(instance_id, execution_id, activity_id)
            try:
                item = decode_message(payload)
                if not isinstance(item, ActivityExecute):
                    raise DecodeError(f"a {item.TYPE} does not belong on the worker queue")
            except Exception as exc:
                leases.append(WorkItemLease(token, attempt_count, ref, None, f"work item {row_id}: {exc}"))
                continue
            leases.append(WorkItemLease(token, attempt_count, ref, item))
        return leases

    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """Delete each leased item and enqueue its completion, atomically per ack.

        An ack with ``lock_instance`` also locks the completion's instance if no one holds it, and
        gets that item as its result.
        """
        now = _store.now_ms()
        prepared: list[Unit | ProviderError] = []
        locking: str | None = None  # one token prefix for the direct locks of this call
        for n, ack in enumerate(acks):
            try:
                row_id = _store.row_of_token("ack_work_items", ack.lock_token)
                completion: tuple[Any, ...] | None = None
                wake: tuple[bool, int | None] = (False, None)
                instance_lock: tuple[str, int] | None = None
                if ack.completion is not None:
                    rows, wake = self._orchestrator_rows([ack.completion], now)
                    completion = rows[0]
                    if ack.lock_instance is not None:
                        if locking is None:
                            locking = self._next_prefix("o")
                        token = f"{locking}{n}:{ack.completion.instance_id}"
                        instance_lock = (token, _ms(ack.lock_instance))
                prepared.append((_store.ack_work, (row_id, ack.lock_token, completion, wake, instance_lock)))
            except Exception as exc:
                prepared.append(as_provider_error("ack_work_items", exc))
        # Light: an activity result lost to a power cut only means the activity runs again (they
        # are at-least-once), and a lost instance lock is simply taken again; the turn that
        # consumes the result commits durably, and its fsync covers this commit too, so no turn
        # can survive while the result it used is lost.
        results = await self._call_each("ack_work_items", prepared, LIGHT)
        if locking is not None:
            for n, locked in enumerate(results):
                if isinstance(locked, tuple):
                    results[n] = _orchestration_item(locked)
        return results

    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release a lease without completing (see the contract)."""
        await self._call(
            "abandon_work_item", LIGHT, _store.abandon_work, lock_token, _ms(delay), bool(ignore_attempt)
        )

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """Extend each held lease; per token whether it is still held."""
        if not lock_tokens:
            return []
        leases: list[tuple[int, str] | None] = []
        for token in lock_tokens:
            try:
                leases.append((_store.row_of_token("renew_work_item_locks", token), token))
            except ProviderError:
                leases.append(None)
        result: list[bool] = await self._call(
            "renew_work_item_locks", LIGHT, _store.renew_work, leases, _ms(lock_timeout)
        )
        return result

    # -- client side -------------------------------------------------------------------------

    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """Append messages to the orchestrator queue, visible at their ``visible_at_ms`` or now."""
        if not messages:
            return
        try:
            rows, wake = self._orchestrator_rows(messages, _store.now_ms())
        except Exception as exc:
            raise as_provider_error("enqueue_orchestrator_messages", exc) from exc
        await self._call("enqueue_orchestrator_messages", DURABLE, _store.enqueue_orchestrator, rows, wake)

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """Return the events of one execution (the current one by default), by event id."""
        rows = await self._call("read_history", READ, _store.read_history, instance_id, execution_id)
        events: list[Event] = []
        for event_id, payload, stored_execution in rows:
            try:
                event = decode_event(payload)
            except Exception as exc:
                raise ProviderError(
                    "read_history",
                    f"event {event_id} of {instance_id!r} execution {stored_execution} "
                    f"cannot be decoded: {exc}",
                    retryable=False,
                ) from exc
            if event.event_id != event_id:
                raise ProviderError(
                    "read_history",
                    f"event {event_id} of {instance_id!r} execution {stored_execution} is corrupt: "
                    f"its payload says event id {event.event_id}",
                    retryable=False,
                )
            events.append(event)
        return events

    def _read_instance(
        self, connection: sqlite3.Connection, effects: Effects | None, instance_id: str
    ) -> tuple[Any, ...] | None:
        row = _store.get_instance(connection, effects, instance_id)
        self._watch.observed(instance_id)
        return row

    def _read_custom_status(
        self, connection: sqlite3.Connection, effects: Effects | None, instance_id: str, last_seen: int
    ) -> tuple[Any, ...] | None:
        row = _store.get_custom_status(connection, effects, instance_id, last_seen)
        self._watch.observed(instance_id)
        return row

    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """Return the instance's stored state, or ``None`` before its first ack."""
        return _instance(await self._call("get_instance", READ, self._read_instance, instance_id))

    async def get_custom_status(
        self, instance_id: str, last_seen_version: int
    ) -> tuple[str | None, int] | None:
        """``(custom_status, version)`` if the version is above ``last_seen_version``, else ``None``."""
        row = await self._call(
            "get_custom_status", READ, self._read_custom_status, instance_id, last_seen_version
        )
        return None if row is None else (row[0], row[1])

    # -- wake-ups ----------------------------------------------------------------------------

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Return as soon as this provider object produced work for ``queue`` (or it came due)."""
        if self._closed:
            raise closed_error("wait_for_work")
        if queue == "orchestrator":
            await self._orchestrator_signal.wait(timeout)
        elif queue == "worker":
            await self._worker_signal.wait(timeout)
        else:
            raise ProviderError("wait_for_work", f"unknown queue {queue!r}", retryable=False)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """Return when an ack through this provider object changed the instance, or after ``timeout``.

        A change is its creation, or a new status or custom status: an ack that only appends
        history wakes no one.
        """
        if self._closed:
            raise closed_error("wait_for_instance_change")
        await self._watch.wait(instance_id, timeout)

    # -- maintenance -------------------------------------------------------------------------

    async def _execute(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one statement on the connection thread in its own transaction (tests, tooling)."""
        result: list[tuple[Any, ...]] = await self._call("execute", DURABLE, _store.execute_sql, sql, params)
        return result


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def from_url(url: str, **options: Any) -> SqliteProvider:
    """Build (without opening) a provider from a URL, as ``perdure.connect`` does.

    ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, ``sqlite://:memory:`` or
    ``sqlite:///:memory:`` (also plain ``sqlite://``). Query parameters ``durability``,
    ``migrate``, ``busy_timeout`` and ``busy_retry_limit`` set the constructor's options;
    keyword ``options`` override them.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.split("+", 1)[0] != "sqlite":
        raise ValueError(f"not a sqlite URL: {url!r}")
    if parts.netloc and parts.netloc != MEMORY:
        raise ValueError(
            f"a sqlite URL has no host: {url!r} (use sqlite:///relative.db or sqlite:////abs.db)"
        )
    path = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.netloc == MEMORY or path in ("", MEMORY):
        path = MEMORY
    settings: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key == "durability":
            settings[key] = value
        elif key == "migrate":
            settings[key] = _flag(value)
        elif key in ("busy_timeout", "busy_retry_limit"):
            settings[key] = float(value)
        else:
            raise ValueError(f"unknown sqlite URL parameter {key!r} in {url!r}")
    settings.update(options)
    return SqliteProvider(path, **settings)
