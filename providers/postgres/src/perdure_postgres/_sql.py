"""Every SQL statement of the provider, rendered once per schema.

Statements are parameterised with binary placeholders (``%(name)b``: arrays of JSON text need no
escaping) and explicit casts (a generic prepared plan knows every type); the schema is a quoted
identifier. Every provider call is one statement, so one round trip and one implicit transaction;
a batch of acks is one statement too.

``NOW`` is the database clock in milliseconds. ``statement_timestamp()`` is stable within a
statement, so a predicate using it can use an index and every row of a statement sees one "now".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

NOW = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint"

TERMINAL = "('completed', 'failed', 'cancelled', 'continued_as_new')"

# Lease bookkeeping (fetch, renew, abandon) commits without waiting for its WAL to reach disk.
# Safe: WAL is flushed in order, so the durable commit of anything that depends on a lease (an
# ack) makes the lease durable too; a crash can only lose a lease nobody acted on, which is the
# same as the fetch never having happened (its holder's ack then fails as "lock lost"). Acks and
# enqueues stay fully durable. This takes one WAL flush off every fetch.
NOSYNC = "set_config('synchronous_commit', 'off', true)"

# A locked instance as returned by a fetch and by a work ack that locks its completion's instance
# directly: the ``items`` CTE's columns, then the instance row. Decoded by one function in provider.py
# (``_item_from_row``), whatever statement produced the row.
_ITEM_COLUMNS = """it.instance_id, it.lock_token, it.attempt_count, it.ids, it.datas,
       e.name, e.version, i.current_execution_id, e.status, e.output, i.parent_instance_id,
       i.custom_status, i.custom_status_version, e.last_event_id, i.created_at_ms, i.updated_at_ms"""

_ITEM_JOINS = """LEFT JOIN {s}.instances i ON i.instance_id = it.instance_id
LEFT JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id"""

#: Lock the instances of ``won`` (columns instance_id, lock_ms) that no one holds, and tag their
#: visible messages: shared by the fetch and the direct lock of a work-item ack, so both take an
#: instance exactly alike.
_LOCK_AND_TAG = """locks AS (
    INSERT INTO {s}.instance_locks AS l (instance_id, lock_token, locked_until_ms)
    SELECT w.instance_id, gen_random_uuid()::text, {now} + w.lock_ms
    FROM won w ORDER BY w.instance_id
    ON CONFLICT (instance_id) DO UPDATE
        SET lock_token = excluded.lock_token, locked_until_ms = excluded.locked_until_ms
        WHERE l.locked_until_ms <= {now}
    RETURNING l.instance_id, l.lock_token
),
tagged AS (
    UPDATE {s}.orchestrator_queue q
    SET lock_token = k.lock_token, attempt_count = q.attempt_count + 1
    FROM locks k
    -- The ANY() makes the instance index the obvious path, whatever the CTE's row estimate.
    WHERE q.instance_id = ANY ((SELECT array_agg(k2.instance_id) FROM locks k2)::text[])
      AND q.instance_id = k.instance_id AND q.visible_at_ms <= {now}
    RETURNING q.instance_id, q.id, q.attempt_count, q.data
),"""

_FETCH_ORCHESTRATION = """
WITH scan AS MATERIALIZED (
    SELECT q.instance_id, row_number() OVER (ORDER BY q.visible_at_ms, q.id) AS rn
    FROM (
        SELECT q.instance_id, q.visible_at_ms, q.id
        FROM {s}.orchestrator_queue q
        WHERE q.visible_at_ms <= {now}
          AND q.instance_id <> ALL (%(exclude)b::text[])
          AND NOT EXISTS (
              SELECT 1 FROM {s}.instance_locks l
              WHERE l.instance_id = q.instance_id AND l.locked_until_ms > {now})
        ORDER BY q.visible_at_ms, q.id
        LIMIT %(scan)b::bigint
    ) q
),
cand AS MATERIALIZED (
    SELECT instance_id, min(rn) AS rn FROM scan GROUP BY instance_id ORDER BY min(rn)
),
won AS MATERIALIZED (
    SELECT c.instance_id, c.rn, %(lease_ms)b::bigint AS lock_ms FROM cand c
    WHERE pg_try_advisory_xact_lock(%(ns)b::int4, hashtext(c.instance_id))
    LIMIT %(limit)b::bigint
),
{lock_and_tag}
items AS (
    SELECT k.instance_id, k.lock_token, w.rn,
           max(t.attempt_count) AS attempt_count,
           array_agg(t.id ORDER BY t.id) FILTER (WHERE t.id IS NOT NULL) AS ids,
           array_agg(t.data ORDER BY t.id) FILTER (WHERE t.id IS NOT NULL) AS datas
    FROM locks k
    JOIN won w ON w.instance_id = k.instance_id
    LEFT JOIN tagged t ON t.instance_id = k.instance_id
    GROUP BY k.instance_id, k.lock_token, w.rn
)
SELECT c.scanned, c.tried, c.candidates, c.nosync, {item_columns}
FROM (SELECT (SELECT count(*) FROM scan) AS scanned,
             (SELECT array_agg(instance_id) FROM won) AS tried,
             (SELECT array_agg(instance_id) FROM cand) AS candidates,
             {nosync} AS nosync) c
LEFT JOIN items it ON true
{item_joins}
ORDER BY it.rn
"""

_RELEASE_EMPTY_LOCKS = """
DELETE FROM {s}.instance_locks WHERE lock_token = ANY (%(tokens)b::text[])
"""

# Rendered twice (see _variant): the parts between "-- [direct" and "-- direct]" lines exist only in
# the statement for batches that use keep_lock or completed_work_items, those between "-- [plain"
# and "-- plain]" only in the other one, so acks that use neither pay nothing for them (not even the
# parsing of a longer statement).
_ACK_ORCHESTRATION = """
WITH a AS MATERIALIZED (
    SELECT * FROM unnest(
        %(idx)b::int[], %(instance_id)b::text[], %(token)b::text[], %(execution_id)b::bigint[],
        %(parent)b::text[], %(cs_changed)b::bool[], %(cs)b::text[], %(name)b::text[], %(version)b::text[],
        %(status)b::text[], %(output)b::text[], %(last_event_id)b::bigint[]
        -- [direct
        , %(keep_ms)b::bigint[], %(consumed)b::int[]
        -- direct]
    ) AS a(idx, instance_id, token, execution_id, parent, cs_changed, cs, name, version, status, output,
           last_event_id
           -- [direct
           , keep_ms, consumed
           -- direct]
           )
    ORDER BY a.instance_id
),
-- [direct
-- Direct dispatch: the worker rows of completed_work_items still leased by the listed tokens,
-- row-locked in id order so that nobody takes (an expired lease), renews or deletes them before the
-- commit. An ack goes ahead only if all of its leases are here (the gate in lk).
held AS MATERIALIZED (
    SELECT k.idx, w.id
    FROM unnest(%(k_idx)b::int[], %(k_id)b::bigint[], %(k_token)b::text[]) AS k(idx, id, token)
    JOIN {s}.worker_queue w ON w.id = k.id
    WHERE w.id = ANY (%(k_id)b::bigint[]) AND w.lock_token = k.token AND w.locked_until_ms > {now}
    ORDER BY w.id
    FOR UPDATE OF w
),
-- direct]
-- Validate the lock (token and lease) and the leases of completed_work_items, and release the lock;
-- every step below joins this one, so an ack that fails either check changes nothing. The deleted
-- row stays locked until commit, so nobody can take the instance over between the check and the
-- commit.
lk AS (
    DELETE FROM {s}.instance_locks l USING a
    WHERE l.instance_id = ANY (%(instance_id)b::text[])
      AND l.instance_id = a.instance_id AND l.lock_token = a.token AND l.locked_until_ms > {now}
      -- [direct
      AND (a.consumed = 0 OR a.consumed = (SELECT count(*) FROM held h WHERE h.idx = a.idx))
      -- direct]
    RETURNING a.*
),
-- [direct
-- Direct dispatch: keep_lock puts the lock back, same token, with a new lease, unless a message of
-- the instance waits behind it: one visible now and untagged by this lock (it arrived during the
-- turn), or one this batch sends it (oq inserts those, and sibling steps cannot see what it inserts:
-- they are counted from the parameters; a sender whose own ack fails only costs the keeping). The
-- row was deleted by lk, in this transaction, so the insert meets no conflict; a fetcher racing it
-- waits for the commit, then finds the lock live. (Delete-then-insert rather than an update keeps lk
-- a single step, with the row estimate every plan below is built on.)
relock AS (
    INSERT INTO {s}.instance_locks (instance_id, lock_token, locked_until_ms)
    SELECT lk.instance_id, lk.token, {now} + lk.keep_ms FROM lk
    WHERE lk.keep_ms IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {s}.orchestrator_queue q
          WHERE q.instance_id = ANY (%(keep_inst)b::text[])
            AND q.instance_id = lk.instance_id AND q.visible_at_ms <= {now}
            AND q.lock_token IS DISTINCT FROM lk.token)
      AND NOT EXISTS (
          SELECT 1 FROM unnest(%(o_inst)b::text[], %(o_vis)b::bigint[]) AS o(instance_id, visible_at_ms)
          WHERE o.instance_id = lk.instance_id AND coalesce(o.visible_at_ms, {now}) <= {now})
    ORDER BY lk.instance_id
    RETURNING 1
),
-- direct]
inst AS (
    INSERT INTO {s}.instances AS i (instance_id, current_execution_id, parent_instance_id, custom_status,
                                    custom_status_version, created_at_ms, updated_at_ms)
    SELECT lk.instance_id, lk.execution_id, lk.parent, CASE WHEN lk.cs_changed THEN lk.cs END,
           CASE WHEN lk.cs_changed THEN 1 ELSE 0 END, {now}, {now}
    FROM lk
    -- Only an ack that records history creates an instance; one without history still updates
    -- an existing instance (e.g. its custom status) but never creates one.
    WHERE lk.last_event_id > 0 OR EXISTS (SELECT 1 FROM {s}.instances x WHERE x.instance_id = lk.instance_id)
    ON CONFLICT (instance_id) DO UPDATE SET
        current_execution_id = greatest(i.current_execution_id, excluded.current_execution_id),
        custom_status = CASE WHEN excluded.custom_status_version > 0 THEN excluded.custom_status
                             ELSE i.custom_status END,
        custom_status_version = i.custom_status_version + excluded.custom_status_version,
        updated_at_ms = excluded.updated_at_ms
    RETURNING 1
),
-- A new execution row gets everything here; an existing one is updated by ex_upd (which, reading
-- the statement's snapshot, never sees the rows inserted here).
ex_new AS (
    INSERT INTO {s}.executions (instance_id, execution_id, name, version, status, output, last_event_id,
                                created_at_ms, updated_at_ms, completed_at_ms)
    SELECT lk.instance_id, lk.execution_id, lk.name, lk.version, coalesce(lk.status, 'running'), lk.output,
           lk.last_event_id, {now}, {now}, CASE WHEN lk.status IN {terminal} THEN {now} END
    FROM lk
    WHERE lk.last_event_id > 0
    ON CONFLICT (instance_id, execution_id) DO NOTHING
    RETURNING 1
),
ex_upd AS (
    UPDATE {s}.executions e SET
        status = coalesce(lk.status, e.status),
        output = CASE WHEN lk.status IS NULL THEN e.output ELSE lk.output END,
        last_event_id = greatest(e.last_event_id, lk.last_event_id),
        updated_at_ms = {now},
        completed_at_ms = CASE WHEN lk.status IN {terminal} THEN {now} ELSE e.completed_at_ms END
    FROM lk
    WHERE e.instance_id = ANY (%(instance_id)b::text[])
      AND e.instance_id = lk.instance_id AND e.execution_id = lk.execution_id
    RETURNING 1
),
-- Append-only: the primary key rejects a duplicate event id and fails the statement.
hist AS (
    INSERT INTO {s}.history (instance_id, execution_id, event_id, data, created_at_ms)
    SELECT lk.instance_id, lk.execution_id, h.event_id, h.data, {now}
    FROM unnest(%(h_idx)b::int[], %(h_event_id)b::bigint[], %(h_data)b::text[]) AS h(idx, event_id, data)
    JOIN lk ON lk.idx = h.idx
    RETURNING 1
),
cancel AS MATERIALIZED (
    SELECT c.instance_id, c.execution_id, c.activity_id
    FROM unnest(%(c_idx)b::int[], %(c_inst)b::text[], %(c_exec)b::bigint[], %(c_act)b::bigint[])
        AS c(idx, instance_id, execution_id, activity_id)
    JOIN lk ON lk.idx = c.idx
),
-- Items leased directly (w_lease_ms not null) are inserted leased, with the caller's fresh uuid as
-- their stored token (see _FETCH_WORK), inserted in worker_items order.
wq AS (
    INSERT INTO {s}.worker_queue (instance_id, execution_id, activity_id, data, visible_at_ms,
                                  enqueued_at_ms, lock_token, locked_until_ms, attempt_count)
    SELECT w.instance_id, w.execution_id, w.activity_id, w.data, {now}, {now},
           w.lease_token, {now} + w.lease_ms, CASE WHEN w.lease_token IS NOT NULL THEN 1 ELSE 0 END
    FROM unnest(%(w_idx)b::int[], %(w_inst)b::text[], %(w_exec)b::bigint[], %(w_act)b::bigint[],
                %(w_data)b::text[], %(w_lease_token)b::text[], %(w_lease_ms)b::bigint[])
        WITH ORDINALITY AS w(idx, instance_id, execution_id, activity_id, data, lease_token, lease_ms, ord)
    JOIN lk ON lk.idx = w.idx
    -- Scheduled and cancelled in the same ack: the net effect of insert-then-delete is nothing.
    WHERE NOT EXISTS (
        SELECT 1 FROM cancel c
        WHERE c.instance_id = w.instance_id AND c.execution_id = w.execution_id
          AND c.activity_id = w.activity_id)
    ORDER BY w.ord
    RETURNING id, lock_token
),
oq AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, data, visible_at_ms, enqueued_at_ms)
    SELECT o.instance_id, o.data, coalesce(o.visible_at_ms, {now}), {now}
    FROM unnest(%(o_idx)b::int[], %(o_inst)b::text[], %(o_data)b::text[], %(o_vis)b::bigint[])
        AS o(idx, instance_id, data, visible_at_ms)
    JOIN lk ON lk.idx = o.idx
    RETURNING 1
),
cx AS (
    DELETE FROM {s}.worker_queue w USING cancel c
    WHERE w.instance_id = ANY (%(c_inst)b::text[])
      AND w.instance_id = c.instance_id AND w.execution_id = c.execution_id AND w.activity_id = c.activity_id
    RETURNING 1
),
dq AS (
    DELETE FROM {s}.orchestrator_queue q USING lk
    WHERE q.instance_id = ANY (%(instance_id)b::text[])
      AND q.instance_id = lk.instance_id AND q.lock_token = lk.token
    RETURNING 1
)
-- [direct
,
-- direct]
-- [direct
-- The work items consumed in memory (rows held above, of acks that passed the gate).
kd AS (
    DELETE FROM {s}.worker_queue w USING held h
    WHERE w.id = ANY (%(k_id)b::bigint[]) AND w.id = h.id AND h.idx IN (SELECT lk.idx FROM lk)
    RETURNING 1
)
-- direct]
-- Acked positions; positions whose ack created the instance (the statement's snapshot does not see
-- inst's insert, and holding the lock nobody else can create it meanwhile); whether a released
-- instance still has visible messages that arrived during the lock (fetchers that found it locked
-- went back to sleep: they must be woken; a kept lock has none, or it would have been released);
-- the ids and stored tokens of the items leased directly; the ids of the consumed items still
-- leased (to name the lease that failed an ack).
SELECT (SELECT array_agg(idx) FROM lk),
       (SELECT array_agg(lk.idx) FROM lk
        WHERE lk.last_event_id > 0
          AND NOT EXISTS (SELECT 1 FROM {s}.instances x WHERE x.instance_id = lk.instance_id)),
       EXISTS (SELECT 1 FROM lk JOIN {s}.orchestrator_queue q ON q.instance_id = lk.instance_id
               WHERE q.instance_id = ANY (%(instance_id)b::text[])
                 AND q.visible_at_ms <= {now} AND q.lock_token IS DISTINCT FROM lk.token),
       lw.ids, lw.tokens,
       -- [direct
       (SELECT array_agg(id) FROM held)
       -- direct]
       -- [plain
       NULL::bigint[]
       -- plain]
FROM (SELECT array_agg(id) AS ids, array_agg(lock_token) AS tokens FROM wq WHERE lock_token IS NOT NULL) lw
"""

_ABANDON_ORCHESTRATION = """
WITH lk AS (
    DELETE FROM {s}.instance_locks
    WHERE lock_token = %(token)b::text AND locked_until_ms > {now}
    RETURNING instance_id
),
upd AS (
    UPDATE {s}.orchestrator_queue q
    SET lock_token = NULL,
        visible_at_ms = CASE WHEN %(delay_ms)b::bigint > 0 THEN {now} + %(delay_ms)b::bigint
                             ELSE q.visible_at_ms END,
        attempt_count = CASE WHEN %(ignore_attempt)b::bool THEN greatest(q.attempt_count - 1, 0)
                             ELSE q.attempt_count END
    FROM lk
    WHERE q.instance_id = lk.instance_id AND q.lock_token = %(token)b::text
    RETURNING 1
)
SELECT (SELECT count(*) FROM lk), {nosync}
"""

_RENEW_ORCHESTRATION = """
UPDATE {s}.instance_locks SET locked_until_ms = {now} + %(lease_ms)b::bigint
FROM (SELECT {nosync}) AS nosync
WHERE lock_token = %(token)b::text AND locked_until_ms > {now}
RETURNING 1
"""

# A worker lease's token is "<id>:<uuid>": the row stores the uuid (so an item can be inserted
# already leased without knowing its id: an explicit nextval() would need a grant on the identity
# sequence), and acks, renewals and abandons go to the row by its id and compare the uuid.
_FETCH_WORK = """
WITH picked AS (
    SELECT id FROM {s}.worker_queue
    WHERE visible_at_ms <= {now} AND (lock_token IS NULL OR locked_until_ms <= {now})
    ORDER BY id
    LIMIT %(limit)b::bigint
    FOR UPDATE SKIP LOCKED
)
UPDATE {s}.worker_queue w
SET lock_token = gen_random_uuid()::text,
    locked_until_ms = {now} + %(lease_ms)b::bigint,
    attempt_count = w.attempt_count + 1
FROM picked, (SELECT {nosync}) AS nosync
WHERE w.id = picked.id
RETURNING w.id, w.lock_token, w.attempt_count, w.instance_id, w.execution_id, w.activity_id, w.data
"""

_ACK_WORK = """
WITH a AS MATERIALIZED (
    SELECT * FROM unnest(%(ids)b::bigint[], %(tokens)b::text[], %(insts)b::text[], %(datas)b::text[],
                         %(vis)b::bigint[]) AS a(id, token, instance_id, data, visible_at_ms)
),
d AS (
    DELETE FROM {s}.worker_queue w USING a
    WHERE w.id = a.id AND w.lock_token = a.token AND w.locked_until_ms > {now}
    RETURNING w.id
),
ins AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, data, visible_at_ms, enqueued_at_ms)
    SELECT a.instance_id, a.data, coalesce(a.visible_at_ms, {now}), {now}
    FROM a JOIN d ON d.id = a.id
    WHERE a.data IS NOT NULL
    RETURNING 1
)
SELECT (SELECT array_agg(id) FROM d), {nosync}
"""

# The work ack of _ACK_WORK that also locks the instance of a completion (acks with lock_ms set)
# when nobody holds it, exactly as a fetch locks: no live lock in the snapshot, the advisory
# try-lock, the lock row's upsert as the arbiter (same expiry rule), every visible message tagged
# and counted. A statement's CTEs do not see rows inserted by sibling CTEs, so the completions of a
# won instance are inserted already tagged (attempt count 1) rather than tagged afterwards. The acks
# of a batch act in order: the first direct ack for an instance gets the item (``ack_id`` names its
# worker row), with the completions of that ack and of those before it; later ones arrive after the
# lock and wait for a fetch.
_ACK_WORK_LOCK = """
WITH a AS MATERIALIZED (
    SELECT * FROM unnest(%(ids)b::bigint[], %(tokens)b::text[], %(insts)b::text[], %(datas)b::text[],
                         %(vis)b::bigint[], %(lock_ms)b::bigint[])
        WITH ORDINALITY AS a(id, token, instance_id, data, visible_at_ms, lock_ms, ord)
),
d AS (
    DELETE FROM {s}.worker_queue w USING a
    WHERE w.id = a.id AND w.lock_token = a.token AND w.locked_until_ms > {now}
    RETURNING w.id
),
want AS MATERIALIZED (
    SELECT DISTINCT ON (a.instance_id) a.instance_id, a.id, a.lock_ms, a.ord
    FROM a JOIN d ON d.id = a.id
    WHERE a.lock_ms IS NOT NULL AND a.data IS NOT NULL AND coalesce(a.visible_at_ms, {now}) <= {now}
      AND NOT EXISTS (
          SELECT 1 FROM {s}.instance_locks l
          WHERE l.instance_id = a.instance_id AND l.locked_until_ms > {now})
    ORDER BY a.instance_id, a.ord
),
won AS MATERIALIZED (
    SELECT w.instance_id, w.id, w.lock_ms, w.ord FROM want w
    WHERE pg_try_advisory_xact_lock(%(ns)b::int4, hashtext(w.instance_id))
),
{lock_and_tag}
ins AS (
    INSERT INTO {s}.orchestrator_queue (instance_id, data, visible_at_ms, enqueued_at_ms, lock_token,
                                        attempt_count)
    SELECT a.instance_id, a.data, coalesce(a.visible_at_ms, {now}), {now}, k.lock_token,
           CASE WHEN k.lock_token IS NULL THEN 0 ELSE 1 END
    FROM a
    JOIN d ON d.id = a.id
    LEFT JOIN (SELECT k.instance_id, k.lock_token, w.ord FROM locks k JOIN won w USING (instance_id)) k
        ON k.instance_id = a.instance_id AND a.ord <= k.ord AND coalesce(a.visible_at_ms, {now}) <= {now}
    WHERE a.data IS NOT NULL
    ORDER BY a.ord
    RETURNING instance_id, id, attempt_count, data, lock_token
),
msgs AS (
    SELECT t.instance_id, t.id, t.attempt_count, t.data FROM tagged t
    UNION ALL
    SELECT n.instance_id, n.id, n.attempt_count, n.data FROM ins n WHERE n.lock_token IS NOT NULL
),
items AS (
    SELECT k.instance_id, k.lock_token, w.id AS ack_id,
           max(m.attempt_count) AS attempt_count,
           array_agg(m.id ORDER BY m.id) AS ids,
           array_agg(m.data ORDER BY m.id) AS datas
    FROM locks k
    JOIN won w ON w.instance_id = k.instance_id
    JOIN msgs m ON m.instance_id = k.instance_id
    GROUP BY k.instance_id, k.lock_token, w.id
)
SELECT c.done, c.nosync, it.ack_id, {item_columns}
FROM (SELECT (SELECT array_agg(id) FROM d) AS done, {nosync} AS nosync) c
LEFT JOIN items it ON true
{item_joins}
"""

_ABANDON_WORK = """
WITH u AS (
    UPDATE {s}.worker_queue
    SET lock_token = NULL,
        locked_until_ms = NULL,
        visible_at_ms = CASE WHEN %(delay_ms)b::bigint > 0 THEN {now} + %(delay_ms)b::bigint
                             ELSE visible_at_ms END,
        attempt_count = CASE WHEN %(ignore_attempt)b::bool THEN greatest(attempt_count - 1, 0)
                             ELSE attempt_count END
    WHERE id = %(id)b::bigint AND lock_token = %(token)b::text AND locked_until_ms > {now}
    RETURNING 1
)
SELECT (SELECT count(*) FROM u), {nosync}
"""

_RENEW_WORK = """
UPDATE {s}.worker_queue w SET locked_until_ms = {now} + %(lease_ms)b::bigint
FROM unnest(%(ids)b::bigint[], %(tokens)b::text[]) AS a(id, token), (SELECT {nosync}) AS nosync
WHERE w.id = a.id AND w.lock_token = a.token AND w.locked_until_ms > {now}
RETURNING w.id, w.lock_token
"""

_ENQUEUE_ORCHESTRATOR = """
INSERT INTO {s}.orchestrator_queue (instance_id, data, visible_at_ms, enqueued_at_ms)
SELECT o.instance_id, o.data, coalesce(o.visible_at_ms, {now}), {now}
FROM unnest(%(insts)b::text[], %(datas)b::text[], %(vis)b::bigint[]) AS o(instance_id, data, visible_at_ms)
"""

# Sent after the data is committed, in a transaction of its own that does not wait for its commit
# record to reach disk: NOTIFY holds a database-wide lock from its queue insertion until the end of
# commit, so a NOTIFY inside a durable write transaction would serialise every committing writer
# behind one WAL flush each (reliability.md 4.4). A lost notification only delays a wake-up.
_NOTIFY = """
SELECT set_config('synchronous_commit', 'off', true), pg_notify(n.channel, n.payload)
FROM unnest(%(channels)b::text[], %(payloads)b::text[]) AS n(channel, payload)
"""

_READ_HISTORY = """
SELECT h.event_id, h.data FROM {s}.history h
WHERE h.instance_id = %(instance_id)b::text
  AND h.execution_id = coalesce(
      %(execution_id)b::bigint,
      (SELECT i.current_execution_id FROM {s}.instances i WHERE i.instance_id = %(instance_id)b::text))
ORDER BY h.event_id
"""

_GET_INSTANCES = """
SELECT i.instance_id, e.name, e.version, i.current_execution_id, e.status, e.output, i.parent_instance_id,
       i.custom_status, i.custom_status_version, e.last_event_id, i.created_at_ms, i.updated_at_ms
FROM {s}.instances i
LEFT JOIN {s}.executions e ON e.instance_id = i.instance_id AND e.execution_id = i.current_execution_id
WHERE i.instance_id = ANY (%(ids)b::text[])
"""

_GET_CUSTOM_STATUS = """
SELECT custom_status, custom_status_version FROM {s}.instances
WHERE instance_id = %(instance_id)b::text AND custom_status_version > %(version)b::bigint
"""


_COMMENT = re.compile(r"--[^\n]*")
_VARIANT_BLOCK = re.compile(r"^[ \t]*-- \[(direct|plain)\n(.*?)^[ \t]*-- \1\]\n", re.MULTILINE | re.DOTALL)


def _variant(template: str, *, direct: bool) -> str:
    """One variant of a template: with or without its direct-dispatch parts.

    ``-- [direct``/``-- direct]`` blocks are kept only if ``direct``, ``-- [plain``/``-- plain]``
    blocks only if not (blocks do not nest).
    """
    wanted = "direct" if direct else "plain"
    return _VARIANT_BLOCK.sub(lambda m: m.group(2) if m.group(1) == wanted else "", template)


_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Statements:
    """The provider's statements for one schema, rendered to bytes once."""

    fetch_orchestration: bytes
    release_empty_locks: bytes
    ack_orchestration: bytes
    #: The ack for batches using ``keep_lock`` or ``completed_work_items`` (same result columns).
    ack_orchestration_direct: bytes
    abandon_orchestration: bytes
    renew_orchestration: bytes
    fetch_work: bytes
    ack_work: bytes
    ack_work_lock: bytes
    abandon_work: bytes
    renew_work: bytes
    enqueue_orchestrator: bytes
    notify: bytes
    read_history: bytes
    get_instances: bytes
    get_custom_status: bytes

    @classmethod
    def for_schema(cls, schema: str) -> Statements:
        """Render every statement with ``schema`` as a quoted identifier."""
        ident = sql.Identifier(schema)

        def render(template: str, *, direct: bool = False) -> bytes:
            # Only {lock_and_tag}, {item_columns}, {item_joins}, {s}, {now}, {terminal} and
            # {nosync} are substituted; the rest is literal SQL.
            text = _variant(template, direct=direct).replace("{lock_and_tag}", _LOCK_AND_TAG)
            text = text.replace("{item_columns}", _ITEM_COLUMNS).replace("{item_joins}", _ITEM_JOINS)
            text = text.replace("{now}", NOW).replace("{terminal}", TERMINAL).replace("{nosync}", NOSYNC)
            # Comments and indentation out: psycopg caches the parsing of a query only up to 4 KiB,
            # and the acks are longer than that as written. (No literal here holds "--" or runs of
            # spaces.)
            text = _SPACES.sub(" ", _COMMENT.sub("", text)).strip()
            composed = sql.SQL(text).format(s=ident)
            return composed.as_string(None).encode()

        return cls(
            fetch_orchestration=render(_FETCH_ORCHESTRATION),
            release_empty_locks=render(_RELEASE_EMPTY_LOCKS),
            ack_orchestration=render(_ACK_ORCHESTRATION),
            ack_orchestration_direct=render(_ACK_ORCHESTRATION, direct=True),
            abandon_orchestration=render(_ABANDON_ORCHESTRATION),
            renew_orchestration=render(_RENEW_ORCHESTRATION),
            fetch_work=render(_FETCH_WORK),
            ack_work=render(_ACK_WORK),
            ack_work_lock=render(_ACK_WORK_LOCK),
            abandon_work=render(_ABANDON_WORK),
            renew_work=render(_RENEW_WORK),
            enqueue_orchestrator=render(_ENQUEUE_ORCHESTRATOR),
            notify=render(_NOTIFY),
            read_history=render(_READ_HISTORY),
            get_instances=render(_GET_INSTANCES),
            get_custom_status=render(_GET_CUSTOM_STATUS),
        )


__all__ = ["NOW", "Statements"]
