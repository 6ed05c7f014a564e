"""Orchestration acks: atomicity, savepoint isolation in a group commit, instance state."""

from __future__ import annotations

import asyncio

import pytest
from sqlite_support import (
    LOCK,
    ack_for,
    activity,
    completed,
    create_instance,
    fetch_one,
    now_ms,
    raise_event,
    result,
    scheduled,
    start,
    started,
    timer,
)

from perdure.history import (
    ActivityRef,
    ContinueAsNew,
    CustomStatusSet,
    ParentRef,
    SubOrchestrationResult,
)
from perdure.provider import OrchestrationAck, ProviderError, WorkItemAck
from perdure_sqlite import SqliteProvider


async def _count(db: SqliteProvider, table: str) -> int:
    [(n,)] = await db._execute(f"SELECT count(*) FROM {table}")
    return int(n)


async def test_first_ack_creates_instance_execution_and_history(db: SqliteProvider) -> None:
    parent = ParentRef(instance_id="p", execution_id=3, source_id=7)
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    ack = OrchestrationAck(
        lock_token=item.lock_token,
        instance_id="a",
        execution_id=1,
        name="wf",
        version="1.2",
        parent=parent,
        history=[started(), scheduled(2)],
        worker_items=[activity("a", 2)],
        status="running",
    )
    assert await db.ack_orchestration_items([ack]) == [None]
    info = await db.get_instance("a")
    assert info is not None
    assert (info.name, info.version, info.execution_id, info.status) == ("wf", "1.2", 1, "running")
    assert info.parent_instance_id == "p"
    assert info.last_event_id == 2
    assert info.output is None
    assert info.custom_status is None
    assert info.custom_status_version == 0
    assert info.created_at_ms == info.updated_at_ms
    assert [e.event_id for e in await db.read_history("a")] == [1, 2]
    assert await db._execute("SELECT execution_id, status FROM executions") == [(1, "running")]
    assert await _count(db, "orchestrator_queue") == 0
    assert await _count(db, "instance_locks") == 0
    assert await _count(db, "worker_queue") == 1


async def test_duplicate_event_id_fails_permanently_and_changes_nothing(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    ack = ack_for(
        item,
        history=[scheduled(2), started(event_id=1)],  # event 1 already exists
        worker_items=[activity("a", 2)],
        orchestrator_items=[start("child")],
        status="completed",
        output='"x"',
    )
    [error] = await db.ack_orchestration_items([ack])
    assert error is not None
    assert not error.retryable
    assert "duplicate event id" in error.message
    # Nothing was applied: no event 2, no worker item, no child start, status unchanged, lock held.
    assert [e.event_id for e in await db.read_history("a")] == [1]
    assert await _count(db, "worker_queue") == 0
    assert await db._execute("SELECT instance_id FROM orchestrator_queue") == [("a",)]
    info = await db.get_instance("a")
    assert info is not None
    assert info.status == "running"
    assert info.last_event_id == 1
    await db.renew_orchestration_lock(item.lock_token, LOCK)  # still held
    assert await db.fetch_orchestration_items(5, LOCK) == []


async def test_failing_ack_in_a_batch_does_not_affect_the_others(db: SqliteProvider) -> None:
    for name in ("a", "b", "c"):
        await db.enqueue_orchestrator_messages([start(name)])
    a, b, c = await db.fetch_orchestration_items(3, LOCK)
    bad_b = ack_for(b, history=[started(), started()])  # duplicate event id inside one ack
    results = await db.ack_orchestration_items(
        [ack_for(a, history=[started()]), bad_b, ack_for(c, history=[started()])]
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], ProviderError)
    assert not results[1].retryable
    assert await db.get_instance("a") is not None
    assert await db.get_instance("b") is None
    assert await db.get_instance("c") is not None


async def test_concurrent_acks_share_one_transaction_and_fail_alone(db: SqliteProvider) -> None:
    names = [f"i{n}" for n in range(30)]
    await db.enqueue_orchestrator_messages([start(n) for n in names])
    items = await db.fetch_orchestration_items(30, LOCK)
    assert db._db is not None
    before = db._db.transactions
    acks = [
        ack_for(item, history=[started(), started()] if n == 7 else [started()])
        for n, item in enumerate(items)
    ]
    outcomes = await asyncio.gather(*(db.ack_orchestration_items([ack]) for ack in acks))
    errors = [out[0] for out in outcomes]
    assert [n for n, e in enumerate(errors) if e is not None] == [7]
    # The calls were queued while the thread was busy: a few group commits, not 30 transactions.
    assert db._db.transactions - before < 10
    assert await _count(db, "instances") == 29


async def test_ack_with_wrong_token_fails_permanently(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    bogus = OrchestrationAck(lock_token="o-bogus:a", instance_id="a", execution_id=1, name="wf")
    other = OrchestrationAck(lock_token=item.lock_token, instance_id="b", execution_id=1, name="wf")
    for ack in (bogus, other):
        [error] = await db.ack_orchestration_items([ack])
        assert error is not None
        assert not error.retryable


async def test_ack_after_lock_expiry_fails_even_if_nobody_took_it(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db, lock_timeout=0.05)
    await asyncio.sleep(0.1)
    [error] = await db.ack_orchestration_items([ack_for(item, history=[started()])])
    assert error is not None
    assert not error.retryable
    assert await db.get_instance("a") is None


async def test_second_ack_with_the_same_token_fails(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    first, second = await asyncio.gather(
        db.ack_orchestration_items([ack_for(item, history=[started()])]),
        db.ack_orchestration_items([ack_for(item, history=[started()])]),
    )
    assert [first[0] is None, second[0] is None].count(True) == 1


async def test_empty_ack_consumes_messages_and_releases_the_lock(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([raise_event("ghost")])
    item = await fetch_one(db)
    assert await db.ack_orchestration_items([ack_for(item)]) == [None]
    assert await db.get_instance("ghost") is None
    assert await _count(db, "orchestrator_queue") == 0
    assert await _count(db, "instance_locks") == 0
    assert await _count(db, "executions") == 0


async def test_terminal_status_and_output(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    ack = ack_for(item, history=[completed(2)], status="completed", output='"result"')
    assert await db.ack_orchestration_items([ack]) == [None]
    info = await db.get_instance("a")
    assert info is not None
    assert info.status == "completed"
    assert info.output == '"result"'
    [(status, output, completed_at)] = await db._execute(
        "SELECT status, output, completed_at_ms FROM executions WHERE instance_id = 'a'"
    )
    assert (status, output) == ("completed", '"result"')
    assert completed_at is not None


async def test_continue_as_new_moves_the_instance_to_the_next_execution(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    next_start = ContinueAsNew(instance_id="a", execution_id=2, name="wf", input='"2"', version="v2")
    ack = ack_for(
        item,
        history=[completed(2)],
        status="continued_as_new",
        output='"2"',
        orchestrator_items=[next_start],
    )
    assert await db.ack_orchestration_items([ack]) == [None]
    info = await db.get_instance("a")
    assert info is not None
    assert (info.execution_id, info.status) == (1, "continued_as_new")

    item = await fetch_one(db)
    assert item.messages == [next_start]
    ack2 = OrchestrationAck(
        lock_token=item.lock_token,
        instance_id="a",
        execution_id=2,
        name="wf",
        version="v2",
        history=[started(input='"2"')],
        status="running",
    )
    assert await db.ack_orchestration_items([ack2]) == [None]
    info = await db.get_instance("a")
    assert info is not None
    assert (info.execution_id, info.status, info.version, info.last_event_id) == (2, "running", "v2", 1)
    assert info.output is None
    assert [e.event_id for e in await db.read_history("a")] == [1]
    assert [e.event_id for e in await db.read_history("a", 1)] == [1, 2]
    assert await db.read_history("a", 9) == []
    executions = await db._execute("SELECT execution_id, status FROM executions ORDER BY execution_id")
    assert executions == [(1, "continued_as_new"), (2, "running")]


async def test_ack_for_an_older_execution_does_not_change_the_current_state(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    ack = ack_for(item, execution_id=2, history=[started()], status="running")
    assert await db.ack_orchestration_items([ack]) == [None]
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    stale = ack_for(item, execution_id=1, history=[completed(2)], status="completed", output='"x"')
    assert await db.ack_orchestration_items([stale]) == [None]
    info = await db.get_instance("a")
    assert info is not None
    assert (info.execution_id, info.status, info.output) == (2, "running", None)
    assert await db._execute("SELECT status FROM executions WHERE execution_id = 1") == [("completed",)]


async def test_custom_status_is_written_only_when_changed(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    assert await db.get_custom_status("a", 0) is None
    for status, changed in [('"one"', True), ('"ignored"', False), (None, True)]:
        await db.enqueue_orchestrator_messages([raise_event("a")])
        item = await fetch_one(db)
        ack = ack_for(item, custom_status=status, custom_status_changed=changed)
        assert await db.ack_orchestration_items([ack]) == [None]
        if status == '"one"':
            assert await db.get_custom_status("a", 0) == ('"one"', 1)
            assert await db.get_custom_status("a", 1) is None
    assert await db.get_custom_status("a", 1) == (None, 2)
    assert await db.get_custom_status("nope", 0) is None


async def test_custom_status_on_the_creating_ack(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    history = [started(), CustomStatusSet(event_id=2, timestamp_ms=now_ms(), status='"s"')]
    ack = ack_for(item, history=history, custom_status='"s"', custom_status_changed=True)
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await db.get_custom_status("a", 0) == ('"s"', 1)


async def test_scheduling_and_cancelling_one_activity_in_one_ack_leaves_nothing(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a")])
    item = await fetch_one(db)
    ack = ack_for(
        item,
        history=[started(), scheduled(2), scheduled(3)],
        worker_items=[activity("a", 2), activity("a", 3)],
        cancelled_activities=[ActivityRef("a", 1, 2)],
    )
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await db._execute("SELECT activity_id FROM worker_queue") == [(3,)]


async def test_cancelling_a_leased_activity_makes_its_ack_and_renewal_fail(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(5, LOCK)
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    ack = ack_for(item, cancelled_activities=[ActivityRef("a", 1, 2), ActivityRef("a", 1, 99)])
    assert await db.ack_orchestration_items([ack]) == [None]
    assert await db.renew_work_item_locks([lease.lock_token], LOCK) == [False]
    [error] = await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2))])
    assert error is not None
    assert not error.retryable
    assert await _count(db, "orchestrator_queue") == 0  # the completion was not enqueued


async def test_cancellation_matches_the_full_activity_identity(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    wrong = [ActivityRef("a", 2, 2), ActivityRef("b", 1, 2), ActivityRef("a", 1, 3)]
    assert await db.ack_orchestration_items([ack_for(item, cancelled_activities=wrong)]) == [None]
    assert await _count(db, "worker_queue") == 1


async def test_orchestrator_items_route_by_instance_and_visibility(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("parent")])
    item = await fetch_one(db)
    due = now_ms() + 60_000
    to_parent = SubOrchestrationResult(instance_id="other", execution_id=1, source_id=3, result='"r"')
    ack = ack_for(
        item, history=[started()], orchestrator_items=[timer("parent", due), start("child"), to_parent]
    )
    assert await db.ack_orchestration_items([ack]) == [None]
    rows = await db._execute("SELECT instance_id, visible_at_ms FROM orchestrator_queue ORDER BY id")
    assert rows[0] == ("parent", due)
    assert [r[0] for r in rows] == ["parent", "child", "other"]
    fetched = await db.fetch_orchestration_items(10, LOCK)
    assert sorted(i.instance_id for i in fetched) == ["child", "other"]


async def test_last_event_id_tracks_the_highest_event_of_the_current_execution(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    for ids in ([2, 3], [4]):
        await db.enqueue_orchestrator_messages([raise_event("a")])
        item = await fetch_one(db)
        assert await db.ack_orchestration_items([ack_for(item, history=[scheduled(i) for i in ids])]) == [
            None
        ]
    info = await db.get_instance("a")
    assert info is not None
    assert info.last_event_id == 4


async def test_history_is_append_only(db: SqliteProvider) -> None:
    await create_instance(db, "a")
    before = await db._execute("SELECT payload FROM history")
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    [error] = await db.ack_orchestration_items([ack_for(item, history=[started(name="other")])])
    assert error is not None
    assert await db._execute("SELECT payload FROM history") == before


async def test_corrupt_history_raises_a_permanent_error(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    await db._execute("UPDATE history SET payload = 'garbage' WHERE event_id = 2")
    with pytest.raises(ProviderError) as info:
        await db.read_history("a")
    assert not info.value.retryable
    assert "event 2" in info.value.message
    await db._execute(
        "UPDATE history SET payload = ? WHERE event_id = 2",
        ('{"type":"TimerCreated","event_id":9,"timestamp_ms":1,"fire_at_ms":5}',),
    )
    with pytest.raises(ProviderError, match="event id 9"):
        await db.read_history("a")
    # Appending new events to a corrupt history still works (the runtime fails it through poison).
    await db.enqueue_orchestrator_messages([raise_event("a")])
    item = await fetch_one(db)
    assert await db.ack_orchestration_items([ack_for(item, history=[completed(3)], status="failed")]) == [
        None
    ]


async def test_read_history_of_unknown_instance_is_empty(db: SqliteProvider) -> None:
    assert await db.read_history("nope") == []
    assert await db.read_history("nope", 1) == []
    assert await db.get_instance("nope") is None


async def test_an_unencodable_ack_fails_in_its_slot_only(db: SqliteProvider) -> None:
    await db.enqueue_orchestrator_messages([start("a"), start("b")])
    a, b = await db.fetch_orchestration_items(2, LOCK)
    broken = ack_for(a, history=[started()], status="completed", output="\ud800")  # lone surrogate
    errors = await db.ack_orchestration_items([broken, ack_for(b, history=[started()])])
    assert isinstance(errors[0], ProviderError)
    assert not errors[0].retryable
    assert errors[1] is None
