"""The SQL of every provider operation, as units that run on the connection thread.

Each unit is ``fn(connection, effects, *args)``. Arguments arrive fully prepared (JSON already
encoded, rows already shaped) so the thread only executes statements; results leave as raw rows
and are decoded by the calling coroutine. Write units append wake-up *effects* (see the ``FX_``
constants) that the provider applies after the commit.

Lock tokens carry what is needed to find their row without an extra index: an instance lock
token is ``"o<unique>:<instance_id>"`` and a work-item lease token is ``"w<unique>.<row id>"``.
Direct dispatch takes the same locks and leases inside an ack, with the same tokens, so nothing
downstream can tell them from fetched ones; a kept instance lock is the fetched one, extended.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from perdure.provider import ProviderError

Effects = list[tuple[Any, ...]] | None
Row = tuple[Any, ...]

#: Effect kinds: (FX_ORCH, ready_now: bool, earliest_future_ms: int | None) and the same for
#: FX_WORKER; (FX_ORCH_NEXT_DUE, ms | None) after a fetch; (FX_INSTANCE, instance_id).
FX_ORCH = 0
FX_WORKER = 1
FX_ORCH_NEXT_DUE = 2
FX_INSTANCE = 3

INSTANCE_COLUMNS = (
    "instance_id, name, version, execution_id, status, output, parent_instance_id, "
    "custom_status, custom_status_version, last_event_id, created_at_ms, updated_at_ms"
)


def numbered(*values: Any) -> dict[str, Any]:
    """Parameters for a statement with numbered placeholders (``?1``, ``?2``, ...).

    sqlite3 treats those as named, and binding them from a sequence is deprecated (an error from
    Python 3.14 on); a mapping keyed by their numbers is the supported form.
    """
    return {str(n): value for n, value in enumerate(values, 1)}


def now_ms() -> int:
    """Read the application clock, in integer milliseconds."""
    return int(time.time() * 1000)


# -- orchestrator queue ------------------------------------------------------------------------

_SCAN_READY = """
SELECT q.instance_id FROM orchestrator_queue AS q INDEXED BY orchestrator_queue_visible
WHERE q.visible_at_ms <= ?1
  AND NOT EXISTS (
      SELECT 1 FROM instance_locks AS l WHERE l.instance_id = q.instance_id AND l.locked_until_ms > ?1)
ORDER BY q.visible_at_ms, q.id
"""
_LOCK_INSTANCE = """
INSERT INTO instance_locks (instance_id, lock_token, locked_until_ms) VALUES (?, ?, ?)
ON CONFLICT (instance_id) DO UPDATE
SET lock_token = excluded.lock_token, locked_until_ms = excluded.locked_until_ms
"""
_TAG_MESSAGES = """
UPDATE orchestrator_queue SET lock_token = ?, attempt_count = attempt_count + 1
WHERE instance_id = ? AND visible_at_ms <= ?
RETURNING id, payload, attempt_count
"""
_SELECT_INSTANCE = f"SELECT {INSTANCE_COLUMNS} FROM instances WHERE instance_id = ?"
_NEXT_DUE = "SELECT min(visible_at_ms) FROM orchestrator_queue WHERE visible_at_ms > ?"
#: Take the instance lock only if no one holds it (absent or lapsed); otherwise change nothing.
_TRY_LOCK_INSTANCE = """
INSERT INTO instance_locks (instance_id, lock_token, locked_until_ms) VALUES (?1, ?2, ?3)
ON CONFLICT (instance_id) DO UPDATE
SET lock_token = excluded.lock_token, locked_until_ms = excluded.locked_until_ms
WHERE instance_locks.locked_until_ms <= ?4
"""

#: What a lock yields: instance id, token, tagged ``(id, payload, attempt_count)`` rows, instance row.
LockedItem = tuple[str, str, list[Row], Row | None]


def fetch_orchestration(
    connection: sqlite3.Connection, effects: Effects, limit: int, lock_ms: int, token_prefix: str
) -> list[LockedItem]:
    """Lock up to ``limit`` ready instances; per instance its token, tagged messages and row."""
    now = now_ms()
    chosen: list[str] = []
    seen: set[str] = set()
    cursor = connection.execute(
        _SCAN_READY,
        numbered(
            now,
        ),
    )
    try:
        for (instance_id,) in cursor:
            if instance_id not in seen:
                seen.add(instance_id)
                chosen.append(instance_id)
                if len(chosen) >= limit:
                    break
    finally:
        cursor.close()
    execute = connection.execute
    until = now + lock_ms
    items: list[LockedItem] = []
    for n, instance_id in enumerate(chosen):
        token = f"{token_prefix}{n}:{instance_id}"
        execute(_LOCK_INSTANCE, (instance_id, token, until))
        items.append(_tag(connection, instance_id, token, now))
    if effects is not None:
        effects.append((FX_ORCH_NEXT_DUE, execute(_NEXT_DUE, (now,)).fetchone()[0]))
    return items


def _tag(connection: sqlite3.Connection, instance_id: str, token: str, now: int) -> LockedItem:
    """Tag (and count) every visible message of an instance just locked with ``token``; read its row."""
    execute = connection.execute
    messages = execute(_TAG_MESSAGES, (token, instance_id, now)).fetchall()
    messages.sort()
    return instance_id, token, messages, execute(_SELECT_INSTANCE, (instance_id,)).fetchone()


def instance_of_token(operation: str, lock_token: str) -> str:
    """Return the instance id inside an instance lock token (lock-lost error if it is not one)."""
    head, sep, instance_id = lock_token.partition(":")
    if not sep or not head.startswith("o"):
        raise ProviderError.lock_lost(operation, lock_token)
    return instance_id


def row_of_token(operation: str, lock_token: str) -> int:
    """Return the worker-queue row id inside a lease token (lock-lost error if it is not one)."""
    head, sep, row_id = lock_token.rpartition(".")
    if not sep or not head.startswith("w") or not row_id.isdigit():
        raise ProviderError.lock_lost(operation, lock_token)
    return int(row_id)


_RELEASE_LOCK = "DELETE FROM instance_locks WHERE instance_id = ? AND lock_token = ? AND locked_until_ms > ?"
#: Whether the instance has a visible message not tagged by the lock ?2 (one that arrived during
#: the lock, or whose earlier lock lapsed): evaluated while the tagged ones still exist.
_UNTAGGED_VISIBLE = """EXISTS (
    SELECT 1 FROM orchestrator_queue AS q INDEXED BY orchestrator_queue_instance
    WHERE q.instance_id = ?1 AND q.visible_at_ms <= ?3 AND q.lock_token IS NOT ?2)"""
#: An ack's release and keep validate the lock and report, in the same statement, whether
#: untagged work waits behind it (no row: the lock is not held).
_ACK_RELEASE_LOCK = f"""
DELETE FROM instance_locks WHERE instance_id = ?1 AND lock_token = ?2 AND locked_until_ms > ?3
RETURNING {_UNTAGGED_VISIBLE}
"""
_ACK_KEEP_LOCK = f"""
UPDATE instance_locks SET locked_until_ms = ?4
WHERE instance_id = ?1 AND lock_token = ?2 AND locked_until_ms > ?3
RETURNING {_UNTAGGED_VISIBLE}
"""
#: Release a lock the ack has just validated (and meant to keep).
_DROP_LOCK = "DELETE FROM instance_locks WHERE instance_id = ?"
_DELETE_TAGGED = "DELETE FROM orchestrator_queue WHERE instance_id = ? AND lock_token = ?"
_SELECT_FOR_ACK = "SELECT name, version, execution_id, last_event_id FROM instances WHERE instance_id = ?"
_INSERT_INSTANCE = f"INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE_INSTANCE = """
UPDATE instances SET
    name = ?, version = ?, execution_id = ?, last_event_id = ?,
    status = coalesce(?, status),
    output = CASE WHEN ? THEN ? ELSE output END,
    custom_status = CASE WHEN ? THEN ? ELSE custom_status END,
    custom_status_version = custom_status_version + ?,
    updated_at_ms = ?
WHERE instance_id = ?
"""
_INSERT_EXECUTION = """
INSERT INTO executions (instance_id, execution_id, status, output, started_at_ms, completed_at_ms)
VALUES (?, ?, 'running', NULL, ?, NULL)
ON CONFLICT (instance_id, execution_id) DO NOTHING
"""
_UPSERT_EXECUTION = """
INSERT INTO executions (instance_id, execution_id, status, output, started_at_ms, completed_at_ms)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (instance_id, execution_id) DO UPDATE
SET status = excluded.status, output = excluded.output, completed_at_ms = excluded.completed_at_ms
"""
_INSERT_HISTORY = (
    "INSERT INTO history (instance_id, execution_id, event_id, event_type, payload) VALUES (?, ?, ?, ?, ?)"
)
INSERT_ORCHESTRATOR = (
    "INSERT INTO orchestrator_queue (instance_id, payload, visible_at_ms, enqueued_at_ms) VALUES (?, ?, ?, ?)"
)
_INSERT_WORKER = (
    "INSERT INTO worker_queue"
    " (instance_id, execution_id, activity_id, payload, visible_at_ms, enqueued_at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
#: A row leased at insertion, as a fetch would leave it (``visible_at_ms`` is the lease expiry).
_INSERT_LEASED_WORKER = (
    "INSERT INTO worker_queue"
    " (id, lock_token, locked_until_ms, visible_at_ms, attempt_count,"
    " instance_id, execution_id, activity_id, payload, enqueued_at_ms)"
    " VALUES (?1, ?2, ?3, ?3, 1, ?4, ?5, ?6, ?7, ?8)"
)
_NEXT_WORKER_ID = "SELECT coalesce(max(id), 0) + 1 FROM worker_queue"
_CANCEL_ACTIVITY = "DELETE FROM worker_queue WHERE instance_id = ? AND execution_id = ? AND activity_id = ?"


class AckArgs:
    """One orchestration ack, prepared by the coroutine (rows encoded, wake-ups summarised)."""

    __slots__ = (
        "cancelled",
        "completed_work",
        "custom_status",
        "custom_status_changed",
        "execution_id",
        "history",
        "instance_id",
        "keep_ms",
        "lease_ms",
        "lease_prefix",
        "leased_rows",
        "lock_token",
        "max_event_id",
        "name",
        "orchestrator_rows",
        "orchestrator_wake",
        "output",
        "parent_instance_id",
        "self_visible_at_ms",
        "status",
        "version",
        "worker_rows",
    )

    def __init__(self, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)

    instance_id: str
    lock_token: str
    execution_id: int
    name: str
    version: str | None
    parent_instance_id: str | None
    status: str | None
    output: str | None
    custom_status_changed: bool
    custom_status: str | None
    max_event_id: int
    history: list[Row]
    #: ``(instance_id, execution_id, activity_id, payload)`` of the items to lease at insertion,
    #: with their token prefix and lease length; ``worker_rows`` are the others.
    leased_rows: list[Row]
    lease_prefix: str
    lease_ms: int
    worker_rows: list[Row]
    orchestrator_rows: list[Row]
    orchestrator_wake: tuple[bool, int | None]
    #: The earliest ``visible_at_ms`` among ``orchestrator_rows`` for the acked instance itself.
    self_visible_at_ms: int | None
    cancelled: list[Row]
    #: Direct dispatch: keep the lock this many ms after the commit (``None``: release it).
    keep_ms: int | None
    #: Direct dispatch: ``(row id, lease token)`` of the work items the turn consumed in memory.
    completed_work: list[tuple[int, str]]


def ack_orchestration(connection: sqlite3.Connection, effects: Effects, ack: AckArgs) -> list[str] | None:
    """Commit one turn (see ``Provider.ack_orchestration_items``); the lock is checked first.

    Inside the write transaction nothing can interleave, so validating and releasing (or keeping)
    the lock up front is the same as doing it at commit time. Returns the lease tokens of the
    items leased at insertion (direct dispatch), or None when none were asked for. Any error
    raised here rolls back the unit's savepoint: a failing ack changes nothing.
    """
    execute = connection.execute
    now = now_ms()
    instance_id = ack.instance_id
    lock_token = ack.lock_token
    keep_ms = ack.keep_ms
    if keep_ms is None:
        held = execute(_ACK_RELEASE_LOCK, numbered(instance_id, lock_token, now)).fetchall()
        if not held:
            raise ProviderError.lock_lost("ack_orchestration_items", lock_token)
        waiting = bool(held[0][0])
    else:
        held = execute(_ACK_KEEP_LOCK, numbered(instance_id, lock_token, now, now + keep_ms)).fetchall()
        if not held:
            raise ProviderError.lock_lost("ack_orchestration_items", lock_token)
        own = ack.self_visible_at_ms
        waiting = bool(held[0][0]) or (own is not None and own <= now)
        if waiting:  # visible work must not wait behind a held lock: release it after all
            execute(_DROP_LOCK, (instance_id,))
    if waiting and effects is not None:
        # Those messages arrived while the instance was locked: fetchers told of them found it
        # locked and went back to waiting, so the release must wake them (or they wait a poll).
        effects.append((FX_ORCH, True, None))
    for row_id, lease_token in ack.completed_work:
        # The turn used these results in memory: their leases must still be held, like an
        # activity's own ack requires.
        if execute(_COMPLETE_WORK, (row_id, lease_token, now)).rowcount != 1:
            raise ProviderError.lock_lost("ack_orchestration_items", lease_token)
    execute(_DELETE_TAGGED, (instance_id, lock_token))
    status = ack.status
    # Only an ack that records history creates the instance; one without history may still
    # update an existing instance (its custom status, say).
    if ack.history or (
        (status is not None or ack.custom_status_changed)
        and execute(_SELECT_FOR_ACK, (instance_id,)).fetchone() is not None
    ):
        execution_exists, visible_change = _apply_instance(connection, ack, now)
        # Clients wait for a status or custom status; a history-only turn (one step of a long
        # chain) must not wake them to re-read an instance that looks the same.
        if visible_change and effects is not None:
            effects.append((FX_INSTANCE, instance_id))
        execution_id = ack.execution_id
        if status is None:
            if not execution_exists:
                execute(_INSERT_EXECUTION, (instance_id, execution_id, now))
        else:
            completed = None if status == "running" else now
            execute(_UPSERT_EXECUTION, (instance_id, execution_id, status, ack.output, now, completed))
        if ack.history:
            connection.executemany(_INSERT_HISTORY, ack.history)
    tokens: list[str] | None = None
    if ack.leased_rows:
        # Leased rows get explicit ids (the next ones SQLite would pick: nothing else writes inside
        # this transaction) so that their tokens, which carry the id, go in with the row itself.
        first: int = execute(_NEXT_WORKER_ID).fetchone()[0]
        prefix = ack.lease_prefix
        tokens = [f"{prefix}{first + n}" for n in range(len(ack.leased_rows))]
        until = now + ack.lease_ms
        connection.executemany(
            _INSERT_LEASED_WORKER,
            [
                numbered(first + n, token, until, *row, now)
                for n, (token, row) in enumerate(zip(tokens, ack.leased_rows, strict=True))
            ],
        )
        # No wake-up: nobody else may take them.
    if ack.worker_rows:
        connection.executemany(_INSERT_WORKER, ack.worker_rows)
        if effects is not None:
            effects.append((FX_WORKER, True, None))
    if ack.orchestrator_rows:
        connection.executemany(INSERT_ORCHESTRATOR, ack.orchestrator_rows)
        if effects is not None:
            effects.append((FX_ORCH, *ack.orchestrator_wake))
    # After the inserts: scheduling and cancelling one activity in the same turn leaves nothing.
    if ack.cancelled:
        connection.executemany(_CANCEL_ACTIVITY, ack.cancelled)
    return tokens


def _apply_instance(connection: sqlite3.Connection, ack: AckArgs, now: int) -> tuple[bool, bool]:
    """Create the instance, or move it to the ack's execution, status and custom status.

    Returns whether the ack's execution is the instance's current one (so its row exists), and
    whether a client could see a change: the instance was created, or its status (execution
    included) or custom status was set.
    """
    instance_id = ack.instance_id
    status = ack.status
    changed = ack.custom_status_changed
    row = connection.execute(_SELECT_FOR_ACK, (instance_id,)).fetchone()
    if row is None:
        connection.execute(
            _INSERT_INSTANCE,
            (
                instance_id,
                ack.name,
                ack.version,
                ack.execution_id,
                status or "running",
                ack.output if status is not None else None,
                ack.parent_instance_id,
                ack.custom_status if changed else None,
                1 if changed else 0,
                ack.max_event_id,
                now,
                now,
            ),
        )
        return False, True
    name, version, current, last_event_id = row
    stored_execution: int = current
    set_output = status is not None
    if ack.execution_id > current:  # the first ack of a new execution (continue-as-new)
        name, version, current, last_event_id = ack.name, ack.version, ack.execution_id, ack.max_event_id
        status = status or "running"
        set_output = True
    elif ack.execution_id == current:
        last_event_id = max(last_event_id, ack.max_event_id)
    else:  # an ack for an older execution never changes the instance's current state
        status = None
        set_output = False
    connection.execute(
        _UPDATE_INSTANCE,
        (
            name,
            version,
            current,
            last_event_id,
            status,
            set_output,
            ack.output if ack.status is not None else None,
            changed,
            ack.custom_status,
            1 if changed else 0,
            now,
            instance_id,
        ),
    )
    return ack.execution_id == stored_execution, status is not None or changed


def enqueue_orchestrator(
    connection: sqlite3.Connection, effects: Effects, rows: list[Row], wake: tuple[bool, int | None]
) -> None:
    """Append client messages to the orchestrator queue (never creates an instance)."""
    connection.executemany(INSERT_ORCHESTRATOR, rows)
    if effects is not None:
        effects.append((FX_ORCH, *wake))


_ABANDON_MESSAGES = """
UPDATE orchestrator_queue SET
    lock_token = NULL,
    visible_at_ms = CASE WHEN ?1 > 0 THEN ?2 + ?1 ELSE visible_at_ms END,
    attempt_count = CASE WHEN ?3 THEN max(0, attempt_count - 1) ELSE attempt_count END
WHERE instance_id = ?4 AND lock_token = ?5
"""


def abandon_orchestration(
    connection: sqlite3.Connection, effects: Effects, lock_token: str, delay_ms: int, ignore_attempt: bool
) -> None:
    """Release an instance lock; optionally hide its tagged messages and uncount the fetch."""
    now = now_ms()
    instance_id = instance_of_token("abandon_orchestration_item", lock_token)
    if connection.execute(_RELEASE_LOCK, (instance_id, lock_token, now)).rowcount != 1:
        raise ProviderError.lock_lost("abandon_orchestration_item", lock_token)
    connection.execute(_ABANDON_MESSAGES, numbered(delay_ms, now, ignore_attempt, instance_id, lock_token))
    if effects is not None:
        effects.append((FX_ORCH, delay_ms <= 0, now + delay_ms if delay_ms > 0 else None))


_RENEW_LOCK = """
UPDATE instance_locks SET locked_until_ms = ?
WHERE instance_id = ? AND lock_token = ? AND locked_until_ms > ?
"""


def renew_orchestration(
    connection: sqlite3.Connection, effects: Effects, lock_token: str, lock_ms: int
) -> None:
    """Extend a held instance lock."""
    now = now_ms()
    instance_id = instance_of_token("renew_orchestration_lock", lock_token)
    if connection.execute(_RENEW_LOCK, (now + lock_ms, instance_id, lock_token, now)).rowcount != 1:
        raise ProviderError.lock_lost("renew_orchestration_lock", lock_token)


# -- worker queue ------------------------------------------------------------------------------

_LEASE_WORK = """
UPDATE worker_queue
SET lock_token = ?1 || id, locked_until_ms = ?2, visible_at_ms = ?2, attempt_count = attempt_count + 1
WHERE id IN (SELECT id FROM worker_queue WHERE visible_at_ms <= ?3 ORDER BY id LIMIT ?4)
RETURNING id, instance_id, execution_id, activity_id, payload, attempt_count
"""


def fetch_work(
    connection: sqlite3.Connection, effects: Effects, limit: int, lock_ms: int, token_prefix: str
) -> list[Row]:
    """Lease up to ``limit`` visible items, oldest first.

    A leased row's ``visible_at_ms`` is its lease expiry, so "visible, and unleased or lease
    expired" is the single range condition ``visible_at_ms <= now``.
    """
    now = now_ms()
    rows = connection.execute(_LEASE_WORK, numbered(token_prefix, now + lock_ms, now, limit)).fetchall()
    rows.sort()
    return rows


_COMPLETE_WORK = "DELETE FROM worker_queue WHERE id = ? AND lock_token = ? AND locked_until_ms > ?"


def ack_work(
    connection: sqlite3.Connection,
    effects: Effects,
    row_id: int,
    lock_token: str,
    completion: Row | None,
    wake: tuple[bool, int | None],
    instance_lock: tuple[str, int] | None = None,
) -> LockedItem | None:
    """Delete a leased item and enqueue its completion, only while the lease is held.

    With ``instance_lock = (token, lock_ms)`` (direct dispatch) the completion's instance is then
    locked and tagged exactly as a fetch would, if no one holds it; that locked item is returned.
    """
    execute = connection.execute
    now = now_ms()
    if execute(_COMPLETE_WORK, (row_id, lock_token, now)).rowcount != 1:
        raise ProviderError.lock_lost("ack_work_items", lock_token)
    if completion is None:
        return None
    execute(INSERT_ORCHESTRATOR, completion)
    # Only a completion visible now: a fetch would not have tagged it, so the turn could not use it.
    if instance_lock is not None and completion[2] <= now:
        instance_id: str = completion[0]
        token, lock_ms = instance_lock
        if execute(_TRY_LOCK_INSTANCE, numbered(instance_id, token, now + lock_ms, now)).rowcount == 1:
            return _tag(connection, instance_id, token, now)  # the caller runs it: no wake-up
    if effects is not None:
        effects.append((FX_ORCH, *wake))
    return None


_ABANDON_WORK = """
UPDATE worker_queue SET
    lock_token = NULL, locked_until_ms = NULL, visible_at_ms = ?1 + ?2,
    attempt_count = CASE WHEN ?3 THEN max(0, attempt_count - 1) ELSE attempt_count END
WHERE id = ?4 AND lock_token = ?5 AND locked_until_ms > ?1
"""


def abandon_work(
    connection: sqlite3.Connection, effects: Effects, lock_token: str, delay_ms: int, ignore_attempt: bool
) -> None:
    """Release a lease; optionally hide the item for ``delay_ms`` and uncount the fetch."""
    now = now_ms()
    row_id = row_of_token("abandon_work_item", lock_token)
    delay_ms = max(0, delay_ms)
    if (
        connection.execute(
            _ABANDON_WORK, numbered(now, delay_ms, ignore_attempt, row_id, lock_token)
        ).rowcount
        != 1
    ):
        raise ProviderError.lock_lost("abandon_work_item", lock_token)
    if effects is not None:
        effects.append((FX_WORKER, delay_ms == 0, now + delay_ms if delay_ms else None))


_RENEW_WORK = """
UPDATE worker_queue SET locked_until_ms = ?1, visible_at_ms = ?1
WHERE id = ?2 AND lock_token = ?3 AND locked_until_ms > ?4
"""


def renew_work(
    connection: sqlite3.Connection, effects: Effects, leases: list[tuple[int, str] | None], lock_ms: int
) -> list[bool]:
    """Extend each held lease; per lease whether it is still held (``None`` entries are not)."""
    now = now_ms()
    until = now + lock_ms
    execute = connection.execute
    return [
        lease is not None and execute(_RENEW_WORK, numbered(until, lease[0], lease[1], now)).rowcount == 1
        for lease in leases
    ]


# -- reads -------------------------------------------------------------------------------------

_READ_CURRENT_HISTORY = """
SELECT h.event_id, h.payload, h.execution_id FROM instances AS i
JOIN history AS h ON h.instance_id = i.instance_id AND h.execution_id = i.execution_id
WHERE i.instance_id = ? ORDER BY h.event_id
"""
_READ_HISTORY = (
    "SELECT event_id, payload, execution_id FROM history WHERE instance_id = ? AND execution_id = ? "
    "ORDER BY event_id"
)


def read_history(
    connection: sqlite3.Connection, effects: Effects, instance_id: str, execution_id: int | None
) -> list[Row]:
    """Raw ``(event_id, payload, execution_id)`` rows of one execution, by event id."""
    if execution_id is None:
        return connection.execute(_READ_CURRENT_HISTORY, (instance_id,)).fetchall()
    return connection.execute(_READ_HISTORY, (instance_id, execution_id)).fetchall()


def get_instance(connection: sqlite3.Connection, effects: Effects, instance_id: str) -> Row | None:
    """Read the raw instance row, or None."""
    row: Row | None = connection.execute(_SELECT_INSTANCE, (instance_id,)).fetchone()
    return row


_CUSTOM_STATUS = (
    "SELECT custom_status, custom_status_version FROM instances "
    "WHERE instance_id = ? AND custom_status_version > ?"
)


def get_custom_status(
    connection: sqlite3.Connection, effects: Effects, instance_id: str, last_seen_version: int
) -> Row | None:
    """``(custom_status, version)`` if newer than ``last_seen_version``."""
    row: Row | None = connection.execute(_CUSTOM_STATUS, (instance_id, last_seen_version)).fetchone()
    return row


def execute_sql(
    connection: sqlite3.Connection, effects: Effects, sql: str, params: tuple[Any, ...] | dict[str, Any]
) -> list[Row]:
    """Run one arbitrary statement (tests and maintenance tools)."""
    return connection.execute(sql, params).fetchall()
