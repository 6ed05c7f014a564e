"""Initial schema: instances, executions, history, both queues and instance locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

Design notes (the provider module docstring has the full story):

* Times are BIGINT milliseconds of the *database* clock (``statement_timestamp()``), except the
  ``visible_at_ms`` of timers, which the runtime computes; see ``perdure_postgres.provider``.
* ``instance_locks`` holds one row per locked instance, apart from the messages it tags. Rows are
  deleted on ack/abandon; an expired row is simply taken over by the next fetch.
* Queue payloads are opaque JSON text; the routing columns (instance, execution, activity ids,
  visibility) are all the provider ever looks at.
* No index on ``orchestrator_queue.lock_token`` or ``worker_queue.lock_token``: tagging and
  leasing then update no indexed column, so those updates can be HOT (heap-only) and the queue
  indexes do not bloat. Acks find their rows through ``instance_id`` (orchestrator) or the row id
  carried inside the worker lease token.
* Queue tables are high-churn: small fillfactor for HOT updates and aggressive autovacuum.
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema, "perdure migrations need a schema (version_table_schema)"
    return op.get_bind().dialect.identifier_preparer.quote_schema(schema)


def upgrade() -> None:
    """Create the tables and indexes."""
    s = _schema()
    op.execute(
        f"""
        CREATE TABLE {s}.instances (
            instance_id            TEXT PRIMARY KEY,
            current_execution_id   BIGINT NOT NULL,
            parent_instance_id     TEXT,
            custom_status          TEXT,
            custom_status_version  BIGINT NOT NULL DEFAULT 0,
            created_at_ms          BIGINT NOT NULL,
            updated_at_ms          BIGINT NOT NULL
        )
        """
    )
    op.execute(
        f"CREATE INDEX instances_parent_idx ON {s}.instances (parent_instance_id) "
        "WHERE parent_instance_id IS NOT NULL"
    )
    op.execute(
        f"""
        CREATE TABLE {s}.executions (
            instance_id      TEXT NOT NULL,
            execution_id     BIGINT NOT NULL,
            name             TEXT NOT NULL,
            version          TEXT,
            status           TEXT NOT NULL,
            output           TEXT,
            last_event_id    BIGINT NOT NULL DEFAULT 0,
            created_at_ms    BIGINT NOT NULL,
            updated_at_ms    BIGINT NOT NULL,
            completed_at_ms  BIGINT,
            PRIMARY KEY (instance_id, execution_id),
            CONSTRAINT executions_status_check CHECK (
                status IN ('running', 'completed', 'failed', 'cancelled', 'continued_as_new'))
        )
        """
    )
    # Append-only: the primary key is what rejects a duplicate event id.
    op.execute(
        f"""
        CREATE TABLE {s}.history (
            instance_id    TEXT NOT NULL,
            execution_id   BIGINT NOT NULL,
            event_id       BIGINT NOT NULL,
            data           TEXT NOT NULL,
            created_at_ms  BIGINT NOT NULL,
            PRIMARY KEY (instance_id, execution_id, event_id)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE {s}.orchestrator_queue (
            id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            instance_id     TEXT NOT NULL,
            data            TEXT NOT NULL,
            visible_at_ms   BIGINT NOT NULL,
            lock_token      TEXT,
            attempt_count   INTEGER NOT NULL DEFAULT 0,
            enqueued_at_ms  BIGINT NOT NULL
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0)
        """
    )
    # The claim scans visible messages oldest first; the instance index serves tagging and acks.
    op.execute(
        f"CREATE INDEX orchestrator_queue_visible_idx ON {s}.orchestrator_queue "
        "(visible_at_ms, id) INCLUDE (instance_id)"
    )
    op.execute(
        f"CREATE INDEX orchestrator_queue_instance_idx ON {s}.orchestrator_queue (instance_id, visible_at_ms)"
    )
    op.execute(
        f"""
        CREATE TABLE {s}.instance_locks (
            instance_id      TEXT PRIMARY KEY,
            lock_token       TEXT NOT NULL UNIQUE,
            locked_until_ms  BIGINT NOT NULL
        ) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0)
        """
    )
    op.execute(
        f"""
        CREATE TABLE {s}.worker_queue (
            id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            instance_id      TEXT NOT NULL,
            execution_id     BIGINT NOT NULL,
            activity_id      BIGINT NOT NULL,
            data             TEXT NOT NULL,
            visible_at_ms    BIGINT NOT NULL,
            lock_token       TEXT,
            locked_until_ms  BIGINT,
            attempt_count    INTEGER NOT NULL DEFAULT 0,
            enqueued_at_ms   BIGINT NOT NULL
        ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0)
        """
    )
    # Cancellation by activity identity (an orchestration ack deletes the row).
    op.execute(
        f"CREATE INDEX worker_queue_activity_idx ON {s}.worker_queue (instance_id, execution_id, activity_id)"
    )


def downgrade() -> None:
    """Drop every table (the schema and the version table stay)."""
    s = _schema()
    for table in (
        "worker_queue",
        "instance_locks",
        "orchestrator_queue",
        "history",
        "executions",
        "instances",
    ):
        op.execute(f"DROP TABLE IF EXISTS {s}.{table}")
