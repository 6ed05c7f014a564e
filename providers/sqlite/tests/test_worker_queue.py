"""Worker queue: leases, FIFO, expiry, renewal, abandon, acks with completions, corrupt payloads."""

from __future__ import annotations

import asyncio

import pytest
from sqlite_support import LOCK, create_instance, fetch_one, result

from perdure.history import ActivityResult
from perdure.provider import ProviderError, WorkItemAck
from perdure_sqlite import SqliteProvider


async def test_fetch_leases_items_oldest_first(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2, 3, 4])
    first = await db.fetch_work_items(2, LOCK)
    second = await db.fetch_work_items(5, LOCK)
    assert [lease.ref.activity_id for lease in first + second] == [2, 3, 4]
    lease = first[0]
    assert lease.attempt_count == 1
    assert lease.item is not None
    assert lease.item.name == "act"
    assert lease.decode_error is None
    assert (lease.ref.instance_id, lease.ref.execution_id) == ("a", 1)
    assert await db.fetch_work_items(5, LOCK) == []
    assert await db.fetch_work_items(0, LOCK) == []


async def test_lease_tokens_are_unique(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=list(range(2, 12)))
    tokens = [lease.lock_token for _ in range(5) for lease in await db.fetch_work_items(2, LOCK)]
    assert len(set(tokens)) == 10


async def test_ack_deletes_the_item_and_enqueues_the_completion(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    assert await db.ack_work_items([WorkItemAck(lease.lock_token, result("a", 2))]) == [None]
    assert await db._execute("SELECT count(*) FROM worker_queue") == [(0,)]
    item = await fetch_one(db)
    assert item.messages == [result("a", 2)]


async def test_ack_without_completion_only_deletes(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    assert await db.ack_work_items([WorkItemAck(lease.lock_token, None)]) == [None]
    assert await db._execute("SELECT count(*) FROM worker_queue") == [(0,)]
    assert await db.fetch_orchestration_items(5, LOCK) == []


async def test_second_ack_and_bad_tokens_fail_in_their_slots(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2, 3])
    one, two = await db.fetch_work_items(2, LOCK)
    assert await db.ack_work_items([WorkItemAck(one.lock_token, None)]) == [None]
    errors = await db.ack_work_items(
        [
            WorkItemAck(one.lock_token, result("a", 2)),
            WorkItemAck("garbage", None),
            WorkItemAck(two.lock_token, result("a", 3)),
        ]
    )
    assert isinstance(errors[0], ProviderError)
    assert not errors[0].retryable
    assert isinstance(errors[1], ProviderError)
    assert not errors[1].retryable
    assert errors[2] is None
    item = await fetch_one(db)
    assert item.messages == [result("a", 3)]  # the failed ack enqueued nothing


async def test_expired_lease_is_fetched_again_and_the_old_ack_fails(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [old] = await db.fetch_work_items(1, 0.05)
    await asyncio.sleep(0.1)
    [new] = await db.fetch_work_items(1, LOCK)
    assert new.attempt_count == 2
    assert new.lock_token != old.lock_token
    [error] = await db.ack_work_items([WorkItemAck(old.lock_token, result("a", 2))])
    assert error is not None
    assert not error.retryable
    assert await db.ack_work_items([WorkItemAck(new.lock_token, result("a", 2))]) == [None]


async def test_expired_lease_cannot_be_acked_even_if_not_refetched(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, 0.05)
    await asyncio.sleep(0.1)
    [error] = await db.ack_work_items([WorkItemAck(lease.lock_token, None)])
    assert error is not None
    assert not error.retryable


async def test_renewal_extends_held_leases_and_reports_lost_ones(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2, 3])
    one, two = await db.fetch_work_items(2, 0.15)
    assert await db.ack_work_items([WorkItemAck(two.lock_token, None)]) == [None]
    renewed = await db.renew_work_item_locks([one.lock_token, two.lock_token, "junk"], 5.0)
    assert renewed == [True, False, False]
    await asyncio.sleep(0.25)
    assert await db.fetch_work_items(5, LOCK) == []
    assert await db.renew_work_item_locks([], LOCK) == []


async def test_renewal_after_expiry_fails(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, 0.05)
    await asyncio.sleep(0.1)
    assert await db.renew_work_item_locks([lease.lock_token], LOCK) == [False]


async def test_abandon_makes_the_item_available_again(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    await db.abandon_work_item(lease.lock_token)
    [again] = await db.fetch_work_items(1, LOCK)
    assert again.attempt_count == 2
    with pytest.raises(ProviderError) as info:
        await db.abandon_work_item(lease.lock_token)
    assert not info.value.retryable


async def test_abandon_with_delay_and_ignore_attempt(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, LOCK)
    await db.abandon_work_item(lease.lock_token, delay=0.3, ignore_attempt=True)
    assert await db.fetch_work_items(1, LOCK) == []
    await asyncio.sleep(0.35)
    [again] = await db.fetch_work_items(1, LOCK)
    assert again.attempt_count == 1
    await db._execute("UPDATE worker_queue SET attempt_count = 0")
    await db.abandon_work_item(again.lock_token, ignore_attempt=True)
    assert await db._execute("SELECT attempt_count FROM worker_queue") == [(0,)]


async def test_abandon_with_an_invalid_or_expired_token_fails(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2])
    [lease] = await db.fetch_work_items(1, 0.05)
    await asyncio.sleep(0.1)
    for token in (lease.lock_token, "w", "nope", "o1:a"):
        with pytest.raises(ProviderError) as info:
            await db.abandon_work_item(token)
        assert not info.value.retryable


async def test_undecodable_item_is_leased_with_its_routing_identity(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=[2, 3])
    await db._execute("UPDATE worker_queue SET payload = 'nope' WHERE activity_id = 2")
    await db._execute(
        "UPDATE worker_queue SET payload = ? WHERE activity_id = 3",
        ('{"type":"RaiseEvent","instance_id":"a","name":"n","data":"1"}',),
    )
    bad, wrong = await db.fetch_work_items(5, LOCK)
    assert bad.item is None
    assert bad.decode_error is not None
    assert "JSON" in bad.decode_error
    assert (bad.ref.instance_id, bad.ref.execution_id, bad.ref.activity_id) == ("a", 1, 2)
    assert wrong.item is None
    assert wrong.decode_error is not None
    assert "RaiseEvent" in wrong.decode_error
    failure = ActivityResult(instance_id="a", execution_id=1, source_id=2, result='"poison"')
    assert await db.ack_work_items([WorkItemAck(bad.lock_token, failure)]) == [None]


async def test_concurrent_fetchers_never_share_an_item(db: SqliteProvider) -> None:
    await create_instance(db, "a", activities=list(range(2, 42)))
    batches = await asyncio.gather(*(db.fetch_work_items(3, LOCK) for _ in range(20)))
    ids = [lease.ref.activity_id for batch in batches for lease in batch]
    assert sorted(ids) == list(range(2, 42))
