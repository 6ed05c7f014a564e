"""The PostgreSQL provider: many runtime processes on many machines sharing one database.

Storage
    Six tables in one schema (``instances``, ``executions``, ``history``, ``orchestrator_queue``,
    ``instance_locks``, ``worker_queue``) plus alembic's version table, created by the migrations
    in ``migrations/postgres``. Every statement names the schema explicitly (a quoted identifier),
    never through ``search_path``, so several applications or test runs can share one database and
    a transaction-mode pooler cannot send a statement to the wrong schema.

Clock: the database's
    Every lease and visibility comparison uses the *database* clock (``statement_timestamp()`` in
    milliseconds), and the runtime passes durations (``lock_timeout``, ``delay``), never instants,
    for them. A lease is therefore written and checked by the same clock, and workers whose clocks
    disagree cannot steal each other's locks early or keep them too long (``reference/reliability.md``
    4.8: mixing clocks is the bug). The one instant that comes from the application is a message's
    ``visible_at_ms`` (a durable timer's ``fire_at_ms``, computed by the runtime from its
    deterministic orchestration clock); it is compared with the database clock, so a skew between
    the application host and the database shifts when a timer fires by that skew and nothing else.
    Keep hosts NTP-synced, as with any distributed system. ``InstanceInfo`` timestamps are
    database time too.

Orchestrator queue (peek-lock per instance)
    A fetch is one statement: scan the visible messages oldest first (skipping instances with a live
    lock), take a transaction-scoped advisory lock per candidate with ``pg_try_advisory_xact_lock``
    so concurrent fetchers skip each other's candidates instead of queueing behind them, take the
    instance lock with ``INSERT ... ON CONFLICT DO UPDATE WHERE locked_until_ms <= now`` (the row is
    the arbiter: an expired lock is simply taken over, so there is no separate reaper to die), tag
    every visible message of the won instances and return them with the instance row. Locks are
    inserted in instance-id order, and batched acks run in instance-id order, so transactions
    that touch several instances lock them in one global order (no deadlock cycles between
    fetchers and acks). If a fetch finds candidates but wins none of them (other fetchers
    took them first) it tries again, excluding those, so it never reports "no work" because it
    lost a race while other work is eligible (``reference/reliability.md`` 4.1). History is not
    read at fetch; the runtime reads it on a cache miss.

    Why not ``FOR UPDATE SKIP LOCKED`` here, as on the worker queue: the claim is per *instance*,
    and an instance's lock row does not exist before its first claim (instances are created only
    by acks), so there is no row to skip. Skipping locked *message* rows instead lets two fetchers
    take different messages of one instance and then queue on its lock row, or deadlock when each
    claims several instances. The transaction-scoped advisory try-lock is the SKIP LOCKED of a
    row that does not exist yet; the lock row's upsert stays the arbiter, so a hash collision or
    an extra evaluation of the try-lock can only make a fetcher skip a candidate for the few
    milliseconds of another fetch, never double-claim.

Acks
    One statement per ack: its first step deletes the instance lock row *if the token matches and
    the lease has not expired*, and every other step joins that step's result, so an invalid lock
    changes nothing. The deleted lock row stays locked until commit, so nobody can take the
    instance over between that check and the commit. A batch of acks is the same single statement
    over arrays (one round trip, one commit for the batch); if any ack fails with an error the
    statement is rolled back and the acks are replayed one per statement, so the failure is
    reported in its own slot only. Worker acks of a batch are a single statement too. A step that
    joins a table to the batch's rows also names the keys as ``= ANY(<array parameter>)``: the
    generic plan of a prepared statement is built on the statistics of the moment (often of nearly
    empty tables) and could otherwise scan a whole queue or index once the table has grown.

Client calls
    Concurrent ``enqueue_orchestrator_messages`` and ``get_instance`` calls of one process are
    coalesced (:mod:`perdure_postgres._coalesce`): a call goes out at once while fewer than two
    statements of its kind are running, and calls arriving meanwhile share the next statement, so
    a thousand concurrent starts cost a handful of commits instead of a thousand.

Durability
    Turn acks and enqueues commit durably. Lease bookkeeping (fetch, renew, abandon) and activity
    acks commit with ``synchronous_commit = off`` for their own transaction: WAL is flushed in
    order, so the durable turn ack that depends on a lease or consumes an activity's result makes
    it durable too. A crash can only lose a lease nobody acted on (its holder's ack then fails as
    a lost lock) or an activity result no turn consumed yet (the activity runs again: activities
    are at-least-once). That takes a WAL flush off every fetch and every activity.

Worker queue
    ``SELECT ... ORDER BY id FOR UPDATE SKIP LOCKED`` then an update in the same statement; the
    lease token embeds the row id (``"<id>:<uuid>"``) so acks and renewals go straight to the row by
    primary key, and the lock columns carry no index (their updates can be HOT). The row stores the
    uuid part only, so an item can be inserted already leased without knowing its id in advance.

Direct dispatch
    A turn's ack inserts its first ``lease_worker_items`` worker items already leased (a uuid
    chosen by the provider, the lease from the database clock, attempt count 1) and returns the
    leases, in the same statement. An activity's ack with ``lock_instance`` locks the completion's
    instance in the same statement exactly as a fetch would (no live lock in the snapshot, the
    advisory try-lock, the lock row's upsert as the arbiter), inserting the completion already
    tagged since a statement's CTEs cannot see rows inserted by sibling CTEs; the acks of a batch
    act in order. A chain of turns and activities then costs two round trips per step, and no
    notification: nothing it produces is left for another fetcher to hear about.

    With ``keep_lock`` and ``completed_work_items`` it costs one. ``completed_work_items`` are
    validated inside the gate step: the consumed worker rows still leased by the listed tokens are
    row-locked first (``FOR UPDATE``, so a fetch taking over a lease as it lapses, a renewal or a
    cancellation cannot change them before the commit; one that changed a row while the ack waited
    is seen, since the lease is checked again on the row as committed), and an ack takes part only
    if it holds every one of them, so one lost lease fails that ack alone and changes nothing. The
    consumed rows are deleted with the rest. ``keep_lock`` puts the lock row back (same token, new
    lease from the database clock) right after the gate deleted it, unless a message of the
    instance waits: visible now and untagged by the lock in the statement's snapshot, or visible now
    and sent to it by this batch (inserted by the same statement, so invisible to its other steps:
    counted from the parameters). A released instance with such messages wakes the orchestrator
    waiters, as for any lock. Delete-then-insert rather than an update keeps the gate one step, with
    the row estimate every later step's plan is built on; the insert meets no conflict, as the row
    is deleted by the same transaction, and a fetcher racing it waits for the commit and then finds
    the lock live. A message committed by another transaction after the snapshot is not seen: it
    waits for the holder's next ack (which sees it and releases) or for the kept lease to lapse.
    Batches that use neither field run a statement rendered without those parts.

Wake-ups
    After a commit the provider wakes its own waiters at once and posts a notification; a
    background task sends the posted notifications, coalesced (at most one per queue, tiny
    payloads, on channels derived from the schema), in one small statement whose transaction does
    not wait for its commit record to reach disk. NOTIFY is deliberately *not* sent from inside
    the write transaction: PostgreSQL holds a database-wide lock from a NOTIFY until the end of
    its transaction's commit, including the WAL flush, which serialised every committing writer
    (measured: ~70% of the client's backends waiting on it). A dedicated LISTEN connection that
    reconnects by itself feeds ``wait_for_work``; see :mod:`perdure_postgres._wakeups`. Instance
    notifications go out only for acks that create the instance or change its status or custom
    status: a turn that only appends history has nobody to wake (a chain step on a kept lock sends
    nothing at all). An ack that releases an instance with messages that arrived during its lock
    wakes the orchestrator waiters: those told of the messages found the instance locked and went
    back to waiting.

Connections, errors, poolers
    psycopg 3 async with ``psycopg_pool.AsyncConnectionPool``; each pooled connection gets
    ``statement_timeout`` in the pool's ``configure`` callback, and a cheap ``check`` (a
    non-blocking look at the socket, a real round trip only if the server sent something to an
    idle connection, e.g. its termination notice) so a connection killed while idle is replaced
    before use. Deadlocks and serialization failures are retried inside the provider; connection
    failures surface as retryable :class:`~perdure.provider.ProviderError`; a duplicate history event
    or a lost lock is permanent. psycopg prepares a statement after it has run a few times on a
    connection; behind PgBouncer in *transaction* mode pass ``prepare_threshold=None`` (or use
    PgBouncer >= 1.21 with ``max_prepared_statements``), set ``listen=False`` (LISTEN needs a
    session; wake-ups then fall back to the runtime's polling) and pass ``statement_timeout=None``
    and set it on the role instead (``SET`` does not stick to a pooled server connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import select
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper
from psycopg_pool import AsyncConnectionPool

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
from perdure_postgres import _errors
from perdure_postgres._coalesce import Coalescer
from perdure_postgres._sql import Statements
from perdure_postgres._wakeups import Listener, Notifier, WakeHub, channel_names, raise_if_cancelling
from perdure_postgres.schema import (
    DEFAULT_SCHEMA,
    HEAD_REVISION,
    SchemaState,
    advisory_key,
    migrate,
    schema_error,
    validate_schema,
    version_query,
)

logger = logging.getLogger("perdure_postgres")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: How many times a deadlock or serialization failure is retried before it is reported.
CONFLICT_RETRIES = 4
#: How many passes a fetch makes when it loses every candidate to concurrent fetchers.
FETCH_PASSES = 3


def _lease_ms(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds <= 0:
        raise ProviderError(
            "lease", f"lock_timeout must be a positive number of seconds, got {seconds!r}", retryable=False
        )
    return max(1, round(seconds * 1000))


def _delay_ms(seconds: float) -> int:
    if not math.isfinite(seconds) or seconds < 0:
        raise ProviderError("abandon", f"delay must be >= 0 seconds, got {seconds!r}", retryable=False)
    return round(seconds * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _execute(conn: Conn, query: bytes, params: dict[str, Any]) -> psycopg.AsyncCursor[Any]:
    """Run one provider statement with binary parameters and results.

    Binary arrays of text need no escaping on either side, which matters for batches of JSON.
    """
    return await conn.cursor(binary=True).execute(query, params)


class PostgresProvider(Provider):
    """A :class:`~perdure.provider.Provider` on PostgreSQL (13+; tested on 15).

    Args:
        dsn: A libpq connection string or URL (``postgresql://user@host:5432/db``).
        schema: The schema holding every table; several apps (or test runs) can share one
            database with different schemas. Created by the migrations if missing.
        min_pool_size, max_pool_size: Bounds of the connection pool. The LISTEN connection is
            extra (one per provider object).
        connect_timeout: Seconds to wait for a new connection (and for a free pooled one).
        statement_timeout: Seconds after which the server cancels a statement (``None``: leave
            the server's setting). Applied to every pooled connection.
        migrate: Run the migrations on :meth:`open` (default). With ``False`` the provider only
            checks that the schema is at the newest revision and raises a clear error if not;
            use that in production where a separate role migrates.
        listen: Keep a LISTEN connection for cross-process wake-ups. Set ``False`` behind a
            transaction-mode pooler (the runtime then relies on polling).
        notify: Send NOTIFY from committing transactions (``False`` for a polling-only setup).
        prepare_threshold: psycopg's automatic prepared statements (``None`` disables them, for
            transaction-mode poolers without prepared-statement support).
        application_name: Reported in ``pg_stat_activity`` unless the DSN sets one.

    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_pool_size: int = 1,
        max_pool_size: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float | None = 30.0,
        migrate: bool = True,
        listen: bool = True,
        notify: bool = True,
        prepare_threshold: int | None = 5,
        application_name: str = "perdure",
    ) -> None:
        if min_pool_size < 0 or max_pool_size < 1 or min_pool_size > max_pool_size:
            raise ValueError(f"invalid pool sizes: min={min_pool_size}, max={max_pool_size}")
        self.dsn = dsn
        self.schema = validate_schema(schema)
        self.min_pool_size = min_pool_size
        self.max_pool_size = max_pool_size
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.auto_migrate = migrate
        self.listen = listen
        self.notify = notify
        self.prepare_threshold = prepare_threshold
        self.application_name = application_name
        self._sql = Statements.for_schema(self.schema)
        self._work_channel, self._instance_channel = channel_names(self.schema)
        self._advisory_ns = advisory_key("perdure_postgres.instance", self.schema)[1]
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._hub: WakeHub | None = None
        self._listener: Listener | None = None
        self._notifier: Notifier | None = None
        #: Tags this object's notifications so its own listener can skip them.
        self._sender = uuid.uuid4().hex[:8]
        self._open_lock: asyncio.Lock | None = None
        self._closed = False
        self._enqueuer: Coalescer[list[tuple[Message, str]], None] = Coalescer(self._enqueue_batch)
        self._instance_reader: Coalescer[str, InstanceInfo | None] = Coalescer(self._get_instances)

    def __repr__(self) -> str:
        return f"PostgresProvider(schema={self.schema!r})"

    @property
    def capabilities(self) -> Capabilities:
        """Wake-ups (LISTEN/NOTIFY, cross-process), a store shared by many processes, direct dispatch."""
        return Capabilities(wakeups=True, cross_process=self.listen, multi_process=True, direct_dispatch=True)

    # -- lifecycle -------------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(self.connect_timeout)),
            "prepare_threshold": self.prepare_threshold,
        }
        try:
            params = conninfo_to_dict(self.dsn)
        except psycopg.ProgrammingError as exc:
            raise ProviderError("open", f"invalid DSN: {exc}", retryable=False) from None
        if "application_name" not in params:
            kwargs["application_name"] = self.application_name
        return kwargs

    async def open(self) -> None:
        """Check or migrate the schema, open the pool and start the listener. Idempotent."""
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._pool is not None:
                return
            if self._closed:
                raise ProviderError("open", "the provider was closed; create a new one", retryable=False)
            kwargs = self._connect_kwargs()
            await self._prepare_schema()
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.dsn,
                kwargs=kwargs,
                min_size=self.min_pool_size,
                max_size=self.max_pool_size,
                open=False,
                configure=self._configure_connection,
                check=self._check_connection,
                timeout=self.connect_timeout,
                name=f"perdure-{self.schema}",
                reconnect_timeout=max(60.0, 10 * self.connect_timeout),
            )
            try:
                await pool.open(wait=self.min_pool_size > 0, timeout=self.connect_timeout)
            except Exception as exc:
                await pool.close()
                raise _errors.to_provider_error("open", exc, schema=self.schema) from exc
            self._pool = pool
            self._hub = WakeHub()
            if self.notify:
                self._notifier = Notifier(
                    self._send_notifications,
                    work_channel=self._work_channel,
                    instance_channel=self._instance_channel,
                    sender=self._sender,
                )
                self._notifier.start()
            if self.listen:
                listener_kwargs = {
                    k: v for k, v in kwargs.items() if k not in ("autocommit", "connect_timeout")
                }
                self._listener = Listener(
                    self.dsn,
                    work_channel=self._work_channel,
                    instance_channel=self._instance_channel,
                    hub=self._hub,
                    sender=self._sender,
                    connect_timeout=self.connect_timeout,
                    connect_kwargs={**listener_kwargs, "prepare_threshold": None},
                )
                self._listener.start()
                # Do not block open() on the listener: a dead listener only delays work.
                await self._listener.wait_connected(min(self.connect_timeout, 2.0))

    async def _prepare_schema(self) -> None:
        """Migrate (``migrate=True``) or verify that the schema is at the newest revision."""
        state = await self._schema_state()
        if state.up_to_date:
            return
        if self.auto_migrate and state.current is not None and state.current not in _known_revisions():
            raise ProviderError("open", schema_error(self.schema, state), retryable=False)
        if not self.auto_migrate:
            raise ProviderError("open", schema_error(self.schema, state), retryable=False)
        try:
            await asyncio.to_thread(
                migrate, self.dsn, schema=self.schema, connect_timeout=self.connect_timeout
            )
        except ProviderError:
            raise
        except Exception as exc:
            raise _errors.to_provider_error("migrate", exc, schema=self.schema) from exc

    async def _schema_state(self) -> SchemaState:
        try:
            async with await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, math.ceil(self.connect_timeout))
            ) as conn:
                try:
                    row = await (await conn.execute(version_query(self.schema))).fetchone()
                except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
                    row = None
        except Exception as exc:
            raise _errors.to_provider_error("open", exc, schema=self.schema) from exc
        return SchemaState(current=row[0] if row else None, head=HEAD_REVISION)

    async def _configure_connection(self, conn: Conn) -> None:
        # Every Python int travels as int8: one prepared statement (and plan) per query, not
        # one per combination of int2/int4/int8 chosen from the values.
        conn.adapters.register_dumper(int, Int8Dumper)
        conn.adapters.register_dumper(int, Int8BinaryDumper)
        if self.statement_timeout is not None:
            ms = max(0, round(self.statement_timeout * 1000))
            await conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(ms)))

    @staticmethod
    async def _check_connection(conn: Conn) -> None:
        """Reject a pooled connection the server has closed while it sat idle.

        An idle connection never receives anything unsolicited except when the server is
        about to close it (termination, shutdown) or sends a notice; a non-blocking look at the
        socket finds that without a round trip, and only then a real query decides.
        """
        if conn.closed or conn.broken:
            raise psycopg.OperationalError("connection closed")
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError) as exc:
            raise psycopg.OperationalError(f"connection socket unusable: {exc}") from None
        if readable:
            await conn.execute("SELECT 1")

    async def close(self) -> None:
        """Stop the listener and close the pool. Idempotent."""
        self._closed = True
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            await notifier.stop()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def drop_schema(self) -> None:
        """Drop the provider's schema with every table in it: all of its data, irrecoverably.

        Meant for tests and teardown of throwaway deployments; the provider stays open but
        unusable until the schema is migrated again.
        """

        async def body(conn: Conn) -> None:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )

        await self._run("drop_schema", body)

    # -- plumbing ----------------------------------------------------------------------------------

    def _require_pool(self, operation: str) -> AsyncConnectionPool[Conn]:
        if self._pool is None:
            raise ProviderError(
                operation, "the provider is not open (call await provider.open())", retryable=False
            )
        return self._pool

    @property
    def hub(self) -> WakeHub:
        """The in-process wake-up hub (created by :meth:`open`)."""
        if self._hub is None:
            raise ProviderError("wakeups", "the provider is not open", retryable=False)
        return self._hub

    @property
    def listener(self) -> Listener | None:
        """The LISTEN connection manager, if ``listen=True`` and open (for tests and diagnostics)."""
        return self._listener

    async def _run(
        self, operation: str, body: Callable[[Conn], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run ``body`` on a pooled connection, mapping errors and retrying conflicts.

        Deadlocks and serialization failures rolled the transaction back, so the body runs again
        (a few times, with jitter). Connection failures are retried once only for ``idempotent``
        bodies (reads); for writes the outcome is unknown, so they surface as retryable errors.
        """
        pool = self._require_pool(operation)
        conflicts = 0
        reconnects = 0
        while True:
            try:
                async with pool.connection() as conn:
                    return await body(conn)
            except ProviderError:
                raise
            except _errors.CONFLICT_ERRORS as exc:
                conflicts += 1
                if conflicts > CONFLICT_RETRIES:
                    raise _errors.to_provider_error(operation, exc, schema=self.schema) from exc
                await asyncio.sleep(random.uniform(0.002, 0.01) * conflicts)
            except Exception as exc:
                raise_if_cancelling(exc)
                if _errors.is_connection_error(exc):
                    await self._refresh_pool(pool)
                    if idempotent and reconnects == 0:
                        reconnects += 1
                        continue
                raise _errors.to_provider_error(operation, exc, schema=self.schema) from exc

    @staticmethod
    async def _refresh_pool(pool: AsyncConnectionPool[Conn]) -> None:
        """After a connection failure, drop every broken idle connection (e.g. after a restart)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.check(), timeout=5.0)

    def _committed(
        self,
        *,
        worker: bool = False,
        orchestrator_now: bool = False,
        timers: Sequence[int] = (),
        instances: Sequence[str] = (),
    ) -> None:
        """Announce what a commit produced: wake this process's waiters now, others by NOTIFY."""
        hub = self._hub
        if hub is not None:
            if worker:
                hub.work("worker")
            if orchestrator_now:
                hub.work("orchestrator")
            for at in timers:
                hub.timer(at)
            for instance_id in instances:
                hub.instance_changed(instance_id)
        if self._notifier is not None:
            self._notifier.post(
                worker=worker, orchestrator_now=orchestrator_now, timers=timers, instances=instances
            )

    async def _send_notifications(self, channels: list[str], payloads: list[str]) -> None:
        params = {"channels": channels, "payloads": payloads}

        async def body(conn: Conn) -> None:
            await _execute(conn, self._sql.notify, params)

        await self._run("notify", body)

    @staticmethod
    def _split_visibility(messages: Sequence[Message]) -> tuple[bool, list[int]]:
        """(any visible now, future visibility times) by the application clock, for wake-ups."""
        now = _now_ms()
        visible_now = False
        future: list[int] = []
        for message in messages:
            at = message.visible_at_ms
            if at is None or at <= now:
                visible_now = True
            else:
                future.append(at)
        return visible_now, future

    # -- orchestrator queue ------------------------------------------------------------------------

    async def fetch_orchestration_items(self, limit: int, lock_timeout: float) -> list[OrchestrationItem]:
        """Lock up to ``limit`` instances with visible messages; see the module docstring."""
        if limit <= 0:
            return []
        lease_ms = _lease_ms(lock_timeout)
        scan = limit * 4 + 16

        async def body(conn: Conn) -> list[OrchestrationItem]:
            exclude: list[str] = []
            for _ in range(FETCH_PASSES):
                params = {
                    "exclude": exclude,
                    "scan": scan,
                    "ns": self._advisory_ns,
                    "limit": limit,
                    "lease_ms": lease_ms,
                }
                rows = await (await _execute(conn, self._sql.fetch_orchestration, params)).fetchall()
                items, empty_tokens = self._build_items([row[4:] for row in rows])
                if empty_tokens:
                    await _execute(conn, self._sql.release_empty_locks, {"tokens": empty_tokens})
                scanned, tried, candidates = rows[0][0], rows[0][1] or [], rows[0][2] or []
                if items or scanned == 0:
                    return items
                if tried:
                    # We won advisory locks but not the lock rows: those instances were claimed
                    # by fetchers that committed after our snapshot. Look again, past them.
                    exclude.extend(tried)
                elif scanned >= scan:
                    # Every candidate in the window is being claimed by another fetcher right
                    # now, and the window was full: eligible work may lie beyond it.
                    exclude.extend(candidates)
                else:
                    # Every visible message belongs to an instance another fetcher is claiming
                    # at this moment: there is no other eligible work.
                    return []
            return []

        return await self._run("fetch_orchestration_items", body)

    @staticmethod
    def _build_items(rows: Sequence[Sequence[Any]]) -> tuple[list[OrchestrationItem], list[str]]:
        """Decode locked-instance rows (``_sql``'s item columns): the items, and empty locks' tokens.

        A lock whose messages all vanished before the tagging is returned as a token to release.
        """
        items: list[OrchestrationItem] = []
        empty: list[str] = []
        for row in rows:
            instance_id, token, ids = row[0], row[1], row[3]
            if instance_id is None:
                continue
            if not ids:
                # Every message vanished between the scan and the tagging (their ack committed
                # meanwhile): give the lock back rather than return an empty item.
                empty.append(token)
                continue
            items.append(_item_from_row(row))
        return items, empty

    async def ack_orchestration_items(self, acks: Sequence[OrchestrationAck]) -> list[OrchestrationAckResult]:
        """Commit each turn atomically: one statement for the whole batch, per-ack fallback on error.

        With ``lease_worker_items`` the ack's result is the leases of the items it inserted leased.
        An ack with ``keep_lock`` keeps its lock unless a message of its instance waits; one whose
        ``completed_work_items`` are not all leased fails as a lost lock naming the first lease that
        is not held, and changes nothing.
        """
        if not acks:
            return []
        self._require_pool("ack_orchestration_items")
        results: list[OrchestrationAckResult] = [None] * len(acks)
        batch: list[_EncodedAck] = []
        for index, ack in enumerate(acks):
            try:
                batch.append(_EncodedAck.build(index, ack))
            except ProviderError as exc:
                results[index] = exc
            except Exception as exc:  # unencodable input: that ack alone fails
                results[index] = ProviderError(
                    "ack_orchestration_items", f"cannot encode ack: {exc}", retryable=False
                )
        # One global order (by instance) for the row locks the acks take: no deadlock cycles.
        batch.sort(key=lambda e: (e.ack.instance_id, e.index))
        if not batch:
            return results
        try:
            outcome = await self._run("ack_orchestration_items", lambda conn: self._ack_batch(conn, batch))
        except ProviderError as exc:
            if exc.retryable or len(batch) == 1:
                for entry in batch:
                    results[entry.index] = exc
                return results
            # A permanent error in one ack (e.g. a duplicate event id) failed the whole statement:
            # replay each ack on its own so only the culprit fails.
            for entry in batch:
                results[entry.index] = await self._ack_alone(entry)
            return results
        for entry, result in zip(batch, outcome, strict=True):
            results[entry.index] = result
        return results

    async def _ack_alone(self, entry: _EncodedAck) -> OrchestrationAckResult:
        async def body(conn: Conn) -> list[OrchestrationAckResult]:
            return await self._ack_batch(conn, [entry])

        try:
            return (await self._run("ack_orchestration_items", body))[0]
        except ProviderError as exc:
            return exc

    async def _ack_batch(self, conn: Conn, batch: Sequence[_EncodedAck]) -> list[OrchestrationAckResult]:
        params: dict[str, list[Any]] = {key: [] for key in _EncodedAck.KEYS}
        for position, entry in enumerate(batch):
            entry.add_to(params, position)
        direct = any(entry.keep_ms is not None or entry.consumed for entry in batch)
        query = self._sql.ack_orchestration_direct if direct else self._sql.ack_orchestration
        row = await (await _execute(conn, query, params)).fetchone()
        done: set[int] = set(row[0] or ()) if row else set()
        created: set[int] = set(row[1] or ()) if row else set()
        # The stored token of a directly leased item is the uuid its ack chose; the lease's token
        # is "<id>:<uuid>", as for a fetched item.
        leased: dict[str, str] = (
            {stored: f"{row_id}:{stored}" for row_id, stored in zip(row[3], row[4], strict=True)}
            if row and row[3]
            else {}
        )
        held: set[int] = set(row[5] or ()) if row else set()
        results: list[OrchestrationAckResult] = []
        worker = False
        # Messages that arrived while an instance was locked are fetchable once the ack releases
        # it; whoever was told of them found the instance locked and went back to waiting.
        orchestrator_now = bool(row and row[2])
        timers: list[int] = []
        instances: list[str] = []
        for position, entry in enumerate(batch):
            if position not in done:
                results.append(entry.lost(held))
                continue
            worker = worker or entry.unleased_workers
            orchestrator_now = orchestrator_now or entry.orchestrator_now
            timers.extend(entry.timers)
            if entry.changed or position in created:
                instances.append(entry.ack.instance_id)
            results.append(entry.leases(leased) if entry.ack.lease_worker_items > 0 else None)
        if done:
            self._committed(
                worker=worker, orchestrator_now=orchestrator_now, timers=timers, instances=instances
            )
        return results

    async def abandon_orchestration_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release an instance lock without committing (optionally delayed, optionally uncounted)."""
        delay_ms = _delay_ms(delay)
        visible_at = _now_ms() + delay_ms
        params = {"token": lock_token, "delay_ms": delay_ms, "ignore_attempt": ignore_attempt}

        async def body(conn: Conn) -> int:
            row = await (await _execute(conn, self._sql.abandon_orchestration, params)).fetchone()
            return int(row[0]) if row else 0

        if await self._run("abandon_orchestration_item", body) == 0:
            raise ProviderError.lock_lost("abandon_orchestration_item", lock_token)
        if delay_ms == 0:
            self._committed(orchestrator_now=True)
        else:
            self._committed(timers=[visible_at])

    async def renew_orchestration_lock(self, lock_token: str, lock_timeout: float) -> None:
        """Extend a held instance lock to ``lock_timeout`` seconds from now (database clock)."""
        params = {"token": lock_token, "lease_ms": _lease_ms(lock_timeout)}

        async def body(conn: Conn) -> bool:
            return (
                await (await _execute(conn, self._sql.renew_orchestration, params)).fetchone()
            ) is not None

        if not await self._run("renew_orchestration_lock", body):
            raise ProviderError.lock_lost("renew_orchestration_lock", lock_token)

    # -- worker queue ------------------------------------------------------------------------------

    async def fetch_work_items(self, limit: int, lock_timeout: float) -> list[WorkItemLease]:
        """Lease up to ``limit`` visible, unleased (or lease-expired) activity items, oldest first."""
        if limit <= 0:
            return []
        params = {"limit": limit, "lease_ms": _lease_ms(lock_timeout)}

        async def body(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await _execute(conn, self._sql.fetch_work, params)).fetchall()

        rows = await self._run("fetch_work_items", body)
        rows.sort(key=lambda r: r[0])
        leases: list[WorkItemLease] = []
        for _id, stored, attempt_count, instance_id, execution_id, activity_id, data in rows:
            token = f"{_id}:{stored}"
            ref = ActivityRef(instance_id=instance_id, execution_id=execution_id, activity_id=activity_id)
            item: ActivityExecute | None = None
            error: str | None = None
            try:
                decoded = decode_message(data)
                if isinstance(decoded, ActivityExecute):
                    item = decoded
                else:
                    error = (
                        f"worker_queue id {_id}: expected an ActivityExecute, found {type(decoded).__name__}"
                    )
            except DecodeError as exc:
                error = f"worker_queue id {_id}: {exc}"
            leases.append(
                WorkItemLease(
                    lock_token=token, attempt_count=attempt_count, ref=ref, item=item, decode_error=error
                )
            )
        return leases

    @staticmethod
    def _work_token(lock_token: str) -> tuple[int, str] | None:
        """``(row id, stored token)`` of a worker lease token ``"<id>:<uuid>"``, or None if malformed."""
        head, sep, tail = lock_token.partition(":")
        if not sep or not tail or not (head.isascii() and head.isdigit()) or len(head) > 18:
            return None
        return int(head), tail

    async def ack_work_items(self, acks: Sequence[WorkItemAck]) -> list[WorkItemAckResult]:
        """Delete each leased item and enqueue its completion, in one statement for the batch.

        An ack with ``lock_instance`` also locks its completion's instance in that statement when
        nobody holds it (as a fetch would); its result is then the locked item.
        """
        if not acks:
            return []
        self._require_pool("ack_work_items")
        results: list[WorkItemAckResult] = [None] * len(acks)
        ids: list[int] = []
        tokens: list[str] = []
        insts: list[str | None] = []
        datas: list[str | None] = []
        vis: list[int | None] = []
        lock_ms: list[int | None] = []
        slots: dict[int, int] = {}
        completions: list[tuple[int, Message]] = []
        for index, ack in enumerate(acks):
            parts = self._work_token(ack.lock_token)
            if parts is None or parts[0] in slots:
                results[index] = ProviderError.lock_lost("ack_work_items", ack.lock_token)
                continue
            completion = ack.completion
            try:
                data = encode_message(completion) if completion is not None else None
                lease = (
                    _lease_ms(ack.lock_instance)
                    if ack.lock_instance is not None and completion is not None
                    else None
                )
            except ProviderError as exc:
                results[index] = ProviderError("ack_work_items", exc.message, retryable=False)
                continue
            except Exception as exc:
                results[index] = ProviderError(
                    "ack_work_items", f"cannot encode completion: {exc}", retryable=False
                )
                continue
            slots[parts[0]] = index
            ids.append(parts[0])
            tokens.append(parts[1])
            insts.append(completion.instance_id if completion is not None else None)
            datas.append(data)
            vis.append(completion.visible_at_ms if completion is not None else None)
            lock_ms.append(lease)
            if completion is not None:
                completions.append((index, completion))
        if not ids:
            return results
        params: dict[str, Any] = {"ids": ids, "tokens": tokens, "insts": insts, "datas": datas, "vis": vis}
        direct = any(ms is not None for ms in lock_ms)
        if direct:
            params["lock_ms"] = lock_ms
            params["ns"] = self._advisory_ns
        query = self._sql.ack_work_lock if direct else self._sql.ack_work

        async def body(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await _execute(conn, query, params)).fetchall()

        try:
            rows = await self._run("ack_work_items", body)
        except ProviderError as exc:
            for index in slots.values():
                results[index] = exc
            return results
        done = set(rows[0][0] or []) if rows else set()
        #: instance id -> the index of the ack whose direct lock won it.
        locked: dict[str, int] = {}
        if direct:
            # Columns: done, nosync, ack_id, then a locked item (all None when nothing was locked).
            for row in rows:
                if row[3] is None:
                    continue
                item = _item_from_row(row[3:])
                results[slots[row[2]]] = item
                locked[item.instance_id] = slots[row[2]]
        for row_id, index in slots.items():
            if row_id not in done:
                results[index] = ProviderError.lock_lost("ack_work_items", acks[index].lock_token)
        # A completion tagged by a direct lock is no work for anybody else: no wake-up for it.
        # (The lock tagged the completions of its ack and of the acks before it in the batch.)
        waiting = [
            c
            for index, c in completions
            if c.visible_at_ms is not None or index > locked.get(c.instance_id, -1)
        ]
        if done and waiting:
            orchestrator_now, timers = self._split_visibility(waiting)
            self._committed(orchestrator_now=orchestrator_now, timers=timers)
        return results

    async def abandon_work_item(
        self, lock_token: str, *, delay: float = 0.0, ignore_attempt: bool = False
    ) -> None:
        """Release a lease without completing (optionally delayed, optionally uncounted)."""
        delay_ms = _delay_ms(delay)
        visible_at = _now_ms() + delay_ms
        parts = self._work_token(lock_token)
        if parts is None:
            raise ProviderError.lock_lost("abandon_work_item", lock_token)
        params = {
            "id": parts[0],
            "token": parts[1],
            "delay_ms": delay_ms,
            "ignore_attempt": ignore_attempt,
        }

        async def body(conn: Conn) -> int:
            row = await (await _execute(conn, self._sql.abandon_work, params)).fetchone()
            return int(row[0]) if row else 0

        if await self._run("abandon_work_item", body) == 0:
            raise ProviderError.lock_lost("abandon_work_item", lock_token)
        if delay_ms == 0:
            self._committed(worker=True)
        elif self._hub is not None:
            self._hub.timer(visible_at, "worker")  # this process only; others poll (module doc)

    async def renew_work_item_locks(self, lock_tokens: Sequence[str], lock_timeout: float) -> list[bool]:
        """Extend each held lease; False for a lease that is gone, expired or taken."""
        if not lock_tokens:
            return []
        lease_ms = _lease_ms(lock_timeout)
        ids: list[int] = []
        tokens: list[str] = []
        for token in lock_tokens:
            parts = self._work_token(token)
            if parts is not None:
                ids.append(parts[0])
                tokens.append(parts[1])
        if not ids:
            return [False] * len(lock_tokens)
        params = {"ids": ids, "tokens": tokens, "lease_ms": lease_ms}

        async def body(conn: Conn) -> set[str]:
            rows = await (await _execute(conn, self._sql.renew_work, params)).fetchall()
            return {f"{row_id}:{stored}" for row_id, stored in rows}

        renewed = await self._run("renew_work_item_locks", body)
        return [token in renewed for token in lock_tokens]

    # -- client side -------------------------------------------------------------------------------

    async def enqueue_orchestrator_messages(self, messages: Sequence[Message]) -> None:
        """Append messages to the orchestrator queue (never creates an instance).

        Concurrent calls from this process are coalesced into few statements (one commit for
        many callers); each call's messages are committed together either way.
        """
        if not messages:
            return
        self._require_pool("enqueue_orchestrator_messages")
        try:
            encoded = [(m, encode_message(m)) for m in messages]
        except Exception as exc:
            raise ProviderError(
                "enqueue_orchestrator_messages", f"cannot encode message: {exc}", retryable=False
            ) from exc
        await self._enqueuer.submit(encoded)

    async def _enqueue_batch(self, calls: Sequence[list[tuple[Message, str]]]) -> list[None]:
        flat = [entry for call in calls for entry in call]
        params = {
            "insts": [m.instance_id for m, _ in flat],
            "datas": [data for _, data in flat],
            "vis": [m.visible_at_ms for m, _ in flat],
        }

        async def body(conn: Conn) -> None:
            await _execute(conn, self._sql.enqueue_orchestrator, params)

        await self._run("enqueue_orchestrator_messages", body)
        now, future = self._split_visibility([m for m, _ in flat])
        self._committed(orchestrator_now=now, timers=future)
        return [None] * len(calls)

    async def read_history(self, instance_id: str, execution_id: int | None = None) -> list[Event]:
        """The events of one execution (the current one by default), ordered by event id."""
        params = {"instance_id": instance_id, "execution_id": execution_id}

        async def body(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await _execute(conn, self._sql.read_history, params)).fetchall()

        rows = await self._run("read_history", body, idempotent=True)
        events: list[Event] = []
        for event_id, data in rows:
            try:
                events.append(decode_event(data))
            except DecodeError as exc:
                raise ProviderError(
                    "read_history",
                    f"instance {instance_id!r} event {event_id} cannot be decoded: {exc}",
                    retryable=False,
                ) from None
        return events

    async def get_instance(self, instance_id: str) -> InstanceInfo | None:
        """The stored state of the instance and its current execution, or None.

        Concurrent calls from this process are coalesced into few indexed reads.
        """
        self._require_pool("get_instance")
        return await self._instance_reader.submit(instance_id)

    async def _get_instances(self, instance_ids: Sequence[str]) -> list[InstanceInfo | None]:
        params = {"ids": list(dict.fromkeys(instance_ids))}

        async def body(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await _execute(conn, self._sql.get_instances, params)).fetchall()

        found: dict[str, InstanceInfo] = {}
        for row in await self._run("get_instance", body, idempotent=True):
            # The columns come in _instance_info's parameter order (see the get_instances SQL).
            found[row[0]] = _instance_info(*row)
        return [found.get(instance_id) for instance_id in instance_ids]

    async def get_custom_status(
        self, instance_id: str, last_seen_version: int
    ) -> tuple[str | None, int] | None:
        """``(custom_status, version)`` if newer than ``last_seen_version``; one indexed read."""
        params = {"instance_id": instance_id, "version": last_seen_version}

        async def body(conn: Conn) -> tuple[Any, ...] | None:
            return await (await _execute(conn, self._sql.get_custom_status, params)).fetchone()

        row = await self._run("get_custom_status", body, idempotent=True)
        return None if row is None else (row[0], int(row[1]))

    # -- wake-ups ----------------------------------------------------------------------------------

    async def wait_for_work(self, queue: Queue, timeout: float) -> None:
        """Return when work may have arrived (NOTIFY, a local commit, a due timer) or at ``timeout``."""
        if self._hub is None:
            await asyncio.sleep(max(0.0, timeout))
            return
        await self._hub.wait_for_work(queue, timeout)

    async def wait_for_instance_change(self, instance_id: str, timeout: float) -> None:
        """Return when the instance's status or custom status may have changed, or at ``timeout``.

        Uses the instance channel (listened to from the first call on); until the listener hears
        it, and whenever the listener is down, it returns after a short poll interval instead.
        """
        if self._hub is None:
            await asyncio.sleep(max(0.0, timeout))
            return
        listener = self._listener
        if listener is None or not listener.listening_to(self._instance_channel):
            if listener is not None:
                listener.want_instance_channel()
            timeout = min(timeout, INSTANCE_POLL_INTERVAL)
        await self._hub.wait_for_instance(instance_id, timeout)


class _EncodedAck:
    """One orchestration ack, encoded once (JSON off the database round trip) for the batch statement."""

    #: The array parameters of the batch statement, one element per ack (or per event/item).
    KEYS = (
        "idx", "instance_id", "token", "execution_id", "parent", "cs_changed", "cs", "name", "version",
        "status", "output", "last_event_id", "keep_ms", "consumed", "keep_inst", "h_idx", "h_event_id",
        "h_data", "c_idx", "c_inst", "c_exec", "c_act", "w_idx", "w_inst", "w_exec", "w_act", "w_data",
        "w_lease_token", "w_lease_ms", "o_idx", "o_inst", "o_data", "o_vis", "k_idx", "k_id", "k_token",
    )  # fmt: skip

    __slots__ = (
        "ack",
        "changed",
        "consumed",
        "events",
        "index",
        "keep_ms",
        "lease_ms",
        "lease_tokens",
        "orchestrator",
        "orchestrator_now",
        "timers",
        "unleased_workers",
        "workers",
    )

    def __init__(self, index: int, ack: OrchestrationAck) -> None:
        self.index = index
        self.ack = ack
        self.events = [(e.event_id, encode_event(e)) for e in ack.history]
        self.workers = [(w, encode_message(w)) for w in ack.worker_items]
        self.orchestrator = [(m, encode_message(m)) for m in ack.orchestrator_items]
        self.orchestrator_now, self.timers = PostgresProvider._split_visibility(ack.orchestrator_items)
        self.changed = ack.status is not None or ack.custom_status_changed
        leased = self._leased_count(ack)
        self.lease_ms: int | None = None
        if leased:
            try:
                self.lease_ms = _lease_ms(ack.worker_lease_timeout)
            except ProviderError as exc:
                raise ProviderError("ack_orchestration_items", exc.message, retryable=False) from None
        #: The stored token (a fresh uuid) of each of the first ``leased`` worker items.
        self.lease_tokens = [str(uuid.uuid4()) for _ in range(leased)]
        #: Whether some worker item is left for fetchers (and so worth a wake-up).
        self.unleased_workers = len(self.workers) > leased
        #: The lease of a kept lock, in milliseconds (``None``: release the lock).
        self.keep_ms = self._keep_ms(ack)
        #: ``(lease token, row id, stored token)`` of each distinct completed work item.
        self.consumed: list[tuple[str, int, str]] = []
        for token in dict.fromkeys(ack.completed_work_items):
            parts = PostgresProvider._work_token(token)
            if parts is None:  # not a token this provider handed out: no lease of it can be held
                raise ProviderError.lock_lost("ack_orchestration_items", token)
            self.consumed.append((token, *parts))

    @staticmethod
    def _keep_ms(ack: OrchestrationAck) -> int | None:
        """``keep_lock`` in milliseconds; raises a permanent error for a bad value."""
        seconds = ack.keep_lock
        if seconds is None:
            return None
        if not math.isfinite(seconds) or seconds <= 0:
            raise ProviderError(
                "ack_orchestration_items",
                f"keep_lock must be a positive number of seconds, got {seconds!r}",
                retryable=False,
            )
        return max(1, round(seconds * 1000))

    @staticmethod
    def _leased_count(ack: OrchestrationAck) -> int:
        """How many worker items to lease directly; raises a permanent error for a bad request."""
        count = ack.lease_worker_items
        if count < 0:
            raise ProviderError(
                "ack_orchestration_items", f"lease_worker_items must be >= 0, got {count}", retryable=False
            )
        count = min(count, len(ack.worker_items))
        if count and ack.cancelled_activities:
            cancelled = {(r.instance_id, r.execution_id, r.activity_id) for r in ack.cancelled_activities}
            for item in ack.worker_items[:count]:
                if (item.instance_id, item.execution_id, item.activity_id) in cancelled:
                    raise ProviderError(
                        "ack_orchestration_items",
                        f"activity {item.activity_id} of {item.instance_id!r} is both leased and cancelled",
                        retryable=False,
                    )
        return count

    @classmethod
    def build(cls, index: int, ack: OrchestrationAck) -> _EncodedAck:
        """Encode ``ack`` (raises if a payload cannot be encoded, ProviderError for a bad request)."""
        return cls(index, ack)

    def leases(self, leased: dict[str, str]) -> list[WorkItemLease]:
        """The ack's direct leases, in ``worker_items`` order, given stored token -> lease token."""
        result: list[WorkItemLease] = []
        for (item, _), stored in zip(self.workers, self.lease_tokens, strict=False):
            ref = ActivityRef(
                instance_id=item.instance_id, execution_id=item.execution_id, activity_id=item.activity_id
            )
            token = leased.get(stored)
            if token is not None:  # always, unless the database lost a row it just inserted
                result.append(WorkItemLease(lock_token=token, attempt_count=1, ref=ref, item=item))
        return result

    def add_to(self, params: dict[str, list[Any]], position: int) -> None:
        """Append this ack's values to the batch statement's array parameters."""
        ack = self.ack
        params["idx"].append(position)
        params["instance_id"].append(ack.instance_id)
        params["token"].append(ack.lock_token)
        params["execution_id"].append(ack.execution_id)
        params["parent"].append(ack.parent.instance_id if ack.parent is not None else None)
        params["cs_changed"].append(bool(ack.custom_status_changed))
        params["cs"].append(ack.custom_status if ack.custom_status_changed else None)
        params["name"].append(ack.name)
        params["version"].append(ack.version)
        params["status"].append(ack.status)
        params["output"].append(ack.output if ack.status is not None else None)
        params["last_event_id"].append(max((event_id for event_id, _ in self.events), default=0))
        params["keep_ms"].append(self.keep_ms)
        params["consumed"].append(len(self.consumed))
        if self.keep_ms is not None:
            params["keep_inst"].append(ack.instance_id)
        for event_id, data in self.events:
            params["h_idx"].append(position)
            params["h_event_id"].append(event_id)
            params["h_data"].append(data)
        for ref in ack.cancelled_activities:
            params["c_idx"].append(position)
            params["c_inst"].append(ref.instance_id)
            params["c_exec"].append(ref.execution_id)
            params["c_act"].append(ref.activity_id)
        for k, (item, data) in enumerate(self.workers):
            params["w_idx"].append(position)
            params["w_inst"].append(item.instance_id)
            params["w_exec"].append(item.execution_id)
            params["w_act"].append(item.activity_id)
            params["w_data"].append(data)
            leased = k < len(self.lease_tokens)
            params["w_lease_token"].append(self.lease_tokens[k] if leased else None)
            params["w_lease_ms"].append(self.lease_ms if leased else None)
        for message, data in self.orchestrator:
            params["o_idx"].append(position)
            params["o_inst"].append(message.instance_id)
            params["o_data"].append(data)
            params["o_vis"].append(message.visible_at_ms)
        for _, row_id, stored in self.consumed:
            params["k_idx"].append(position)
            params["k_id"].append(row_id)
            params["k_token"].append(stored)

    def lost(self, held: set[int]) -> ProviderError:
        """The error of this ack when it was not applied, given the ids of the consumed rows held.

        Names the first completed work item whose lease is not held, else the instance lock.
        """
        for token, row_id, _ in self.consumed:
            if row_id not in held:
                return ProviderError.lock_lost("ack_orchestration_items", token)
        return ProviderError.lock_lost("ack_orchestration_items", self.ack.lock_token)


#: How long ``wait_for_instance_change`` waits when it cannot rely on notifications.
INSTANCE_POLL_INTERVAL = 0.25


def _known_revisions() -> list[str]:
    from perdure_postgres.schema import revisions

    return revisions()


#: Query parameters of a provider URL that configure the provider rather than the connection.
_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "schema": str,
    "min_pool_size": int,
    "max_pool_size": int,
    "connect_timeout": float,
    "statement_timeout": lambda v: None if v.lower() in ("", "none", "off", "0") else float(v),
    "migrate": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "listen": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "notify": lambda v: v.lower() in ("1", "true", "yes", "on"),
    "prepare_threshold": lambda v: None if v.lower() in ("", "none", "off") else int(v),
    "application_name": str,
}


def _instance_info(
    instance_id: str,
    name: str | None,
    version: str | None,
    execution_id: int,
    status: Any,
    output: str | None,
    parent: str | None,
    custom_status: str | None,
    custom_status_version: int,
    last_event_id: int | None,
    created_at_ms: int,
    updated_at_ms: int,
) -> InstanceInfo:
    """An instance row (joined with its current execution) as the contract's InstanceInfo."""
    return InstanceInfo(
        instance_id=instance_id,
        name=name or "",
        version=version,
        execution_id=execution_id,
        status=status or "running",
        output=output,
        parent_instance_id=parent,
        custom_status=custom_status,
        custom_status_version=custom_status_version,
        last_event_id=last_event_id or 0,
        created_at_ms=created_at_ms,
        updated_at_ms=updated_at_ms,
    )


def _item_from_row(row: Sequence[Any]) -> OrchestrationItem:
    """A locked instance as returned by a fetch or a direct lock (``_sql``'s item columns), decoded.

    A message that cannot be decoded, or is not an orchestrator message, is reported in
    ``bad_messages`` (it stays tagged, so the ack deletes it), never raised.
    """
    instance_id, token, attempt_count, ids, datas = row[:5]
    messages: list[Message] = []
    bad: list[str] = []
    for message_id, data in zip(ids or (), datas or (), strict=True):
        try:
            decoded = decode_message(data)
        except DecodeError as exc:
            bad.append(f"orchestrator_queue id {message_id}: {exc}")
            continue
        if isinstance(decoded, ActivityExecute):
            bad.append(
                f"orchestrator_queue id {message_id}: an ActivityExecute is not an orchestrator message"
            )
            continue
        messages.append(decoded)
    # The rest are the instance columns, NULL (no execution) while the instance is not created.
    info = None if row[7] is None else _instance_info(instance_id, *row[5:])
    return OrchestrationItem(
        instance_id=instance_id,
        lock_token=token,
        attempt_count=attempt_count or 0,
        messages=messages,
        instance=info,
        bad_messages=bad,
    )


def from_url(url: str, **options: Any) -> PostgresProvider:
    """Build (not open) a provider from ``postgresql://user:pw@host:port/db?schema=app&...``.

    Provider options may be given as query parameters (``schema``, ``min_pool_size``,
    ``max_pool_size``, ``connect_timeout``, ``statement_timeout``, ``migrate``, ``listen``,
    ``notify``, ``prepare_threshold``, ``application_name``) or as keyword arguments, which win;
    every other query parameter (``sslmode``, ...) is passed to libpq. ``postgres://`` and
    ``postgresql+psycopg://`` are accepted.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    kept: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _URL_OPTIONS:
            try:
                parsed[key] = _URL_OPTIONS[key](value)
            except ValueError:
                raise ValueError(f"invalid value for {key!r} in provider URL: {value!r}") from None
        else:
            kept.append((key, value))
    dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(kept), parts.fragment))
    parsed.update(options)
    return PostgresProvider(dsn, **parsed)


__all__ = ["INSTANCE_POLL_INTERVAL", "PostgresProvider", "from_url"]
