"""The initial perdure SQLite schema: instances, executions, history and the two queues.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Design notes:
* Every timestamp is an integer of milliseconds from the application clock (``time.time()``).
* Queue tables use ``INTEGER PRIMARY KEY`` (the rowid) without AUTOINCREMENT: a new row always
  gets an id above every live row, which is all FIFO needs, and it saves a ``sqlite_sequence``
  write per insert.
* ``orchestrator_queue_visible`` is ``(visible_at_ms, rowid)``: the fetch walks it from the
  oldest visible message and stops at the first ``limit`` unlocked instances, never touching
  future timers.
* The instance lock lives apart from the messages (``instance_locks``), as the contract requires.
* ``history`` rejects a duplicate ``(instance, execution, event id)`` through its primary key:
  history is append-only, nothing is ever overwritten.
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_UPGRADE = [
    """
    CREATE TABLE instances (
        instance_id           TEXT    NOT NULL PRIMARY KEY,
        name                  TEXT    NOT NULL,
        version               TEXT,
        execution_id          INTEGER NOT NULL,
        status                TEXT    NOT NULL,
        output                TEXT,
        parent_instance_id    TEXT,
        custom_status         TEXT,
        custom_status_version INTEGER NOT NULL DEFAULT 0,
        last_event_id         INTEGER NOT NULL DEFAULT 0,
        created_at_ms         INTEGER NOT NULL,
        updated_at_ms         INTEGER NOT NULL
    )
    """,
    """
    CREATE INDEX instances_parent ON instances (parent_instance_id)
        WHERE parent_instance_id IS NOT NULL
    """,
    """
    CREATE TABLE executions (
        instance_id     TEXT    NOT NULL,
        execution_id    INTEGER NOT NULL,
        status          TEXT    NOT NULL,
        output          TEXT,
        started_at_ms   INTEGER NOT NULL,
        completed_at_ms INTEGER,
        PRIMARY KEY (instance_id, execution_id)
    )
    """,
    """
    CREATE TABLE history (
        instance_id  TEXT    NOT NULL,
        execution_id INTEGER NOT NULL,
        event_id     INTEGER NOT NULL CHECK (event_id > 0),
        event_type   TEXT    NOT NULL,
        payload      TEXT    NOT NULL,
        PRIMARY KEY (instance_id, execution_id, event_id)
    )
    """,
    """
    CREATE TABLE orchestrator_queue (
        id             INTEGER PRIMARY KEY,
        instance_id    TEXT    NOT NULL,
        payload        TEXT    NOT NULL,
        visible_at_ms  INTEGER NOT NULL,
        lock_token     TEXT,
        attempt_count  INTEGER NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
        enqueued_at_ms INTEGER NOT NULL
    )
    """,
    "CREATE INDEX orchestrator_queue_visible ON orchestrator_queue (visible_at_ms)",
    "CREATE INDEX orchestrator_queue_instance ON orchestrator_queue (instance_id, visible_at_ms)",
    """
    CREATE TABLE instance_locks (
        instance_id     TEXT    NOT NULL PRIMARY KEY,
        lock_token      TEXT    NOT NULL,
        locked_until_ms INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE worker_queue (
        id              INTEGER PRIMARY KEY,
        instance_id     TEXT    NOT NULL,
        execution_id    INTEGER NOT NULL,
        activity_id     INTEGER NOT NULL,
        payload         TEXT    NOT NULL,
        visible_at_ms   INTEGER NOT NULL,
        lock_token      TEXT,
        locked_until_ms INTEGER,
        attempt_count   INTEGER NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
        enqueued_at_ms  INTEGER NOT NULL
    )
    """,
    "CREATE INDEX worker_queue_activity ON worker_queue (instance_id, execution_id, activity_id)",
]

_TABLES = ["worker_queue", "instance_locks", "orchestrator_queue", "history", "executions", "instances"]


def upgrade() -> None:
    """Create every table and index."""
    for statement in _UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    """Drop every table (and with it every index)."""
    for table in _TABLES:
        op.execute(f"DROP TABLE {table}")
