"""The database itself: busy handling, durability pragmas, lifecycle, URLs, hostile input."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlite_support import LOCK, ack_for, activity, fetch_one, result, scheduled, start, started

from perdure.history import RaiseEvent
from perdure.provider import ProviderError, WorkItemAck
from perdure_sqlite import MAX_PAYLOAD_BYTES, SqliteProvider, _store, from_url
from perdure_sqlite._thread import DURABLE, LIGHT

# -- busy database -------------------------------------------------------------------------------


async def test_a_writer_in_another_connection_delays_but_never_fails_us(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SqliteProvider(path, busy_timeout=0.05) as db:
        await db.enqueue_orchestrator_messages([start("before")])
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        blocker.execute("INSERT INTO instance_locks VALUES ('x', 'y', 0)")
        asyncio.get_running_loop().call_later(0.6, blocker.rollback)
        began = time.perf_counter()
        # Reads are not blocked by a writer in WAL mode.
        assert await db.get_instance("before") is None
        assert time.perf_counter() - began < 0.3
        await db.enqueue_orchestrator_messages([start("during")])
        assert time.perf_counter() - began >= 0.55
        items = await db.fetch_orchestration_items(5, LOCK)
        assert sorted(i.instance_id for i in items) == ["before", "during"]
        blocker.close()


async def test_a_writer_in_another_process_delays_but_never_fails_us(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SqliteProvider(path, busy_timeout=0.05) as db:
        await db.enqueue_orchestrator_messages([start("a")])
        script = (
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(0.8)\n"
            "c.rollback()\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).strip() == b"locked"
        began = time.perf_counter()
        items = await db.fetch_orchestration_items(5, LOCK)
        assert [i.instance_id for i in items] == ["a"]
        assert time.perf_counter() - began > 0.3
        assert await proc.wait() == 0


async def test_a_lock_held_beyond_the_retry_limit_gives_a_retryable_error(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    async with SqliteProvider(path, busy_timeout=0.05, busy_retry_limit=0.3) as db:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(ProviderError) as info:
                await db.enqueue_orchestrator_messages([start("a")])
            assert info.value.retryable
            assert info.value.operation == "enqueue_orchestrator_messages"
            assert "locked" in info.value.message
        finally:
            blocker.rollback()
            blocker.close()
        await db.enqueue_orchestrator_messages([start("a")])  # recovers at once


async def test_opening_waits_for_a_busy_database(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    blocker = sqlite3.connect(path, isolation_level=None)  # a rollback-journal database, not WAL yet
    blocker.execute("CREATE TABLE unrelated (x)")
    blocker.execute("BEGIN EXCLUSIVE")
    blocker.execute("INSERT INTO unrelated VALUES (1)")
    asyncio.get_running_loop().call_later(0.4, blocker.rollback)
    began = time.perf_counter()
    async with SqliteProvider(path, busy_timeout=0.05) as db:
        assert time.perf_counter() - began > 0.3  # switching to WAL and migrating had to wait
        assert await db.get_instance("a") is None
    blocker.close()


# -- durability -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("durability", "expected"), [("full", 2), ("fast", 1)])
async def test_durability_sets_the_synchronous_pragma(tmp_path: Path, durability: str, expected: int) -> None:
    async with SqliteProvider(tmp_path / "d.db", durability=durability) as db:  # type: ignore[arg-type]
        assert await db._execute("PRAGMA synchronous") == [(expected,)]
        assert await db._execute("PRAGMA journal_mode") == [("wal",)]
        assert db.durability == durability


async def test_only_batches_with_durable_writes_pay_for_an_fsync(tmp_path: Path) -> None:
    async with SqliteProvider(tmp_path / "d.db") as db:
        light = (_store.execute_sql, ("PRAGMA synchronous", ()))
        await db.enqueue_orchestrator_messages([start("a")])
        # A batch of only lease moves (fetch, renew, abandon) commits with synchronous=NORMAL ...
        assert (await db._submit("probe", LIGHT, [light]))[0] == [(1,)]
        item = await fetch_one(db)
        # ... and the next durable commit (an ack, an enqueue) fsyncs again, covering both.
        assert (await db._submit("probe", DURABLE, [light]))[0] == [(2,)]
        assert await db.ack_orchestration_items([ack_for(item, history=[started()])]) == [None]
    async with SqliteProvider(tmp_path / "f.db", durability="fast") as db:
        assert (await db._submit("probe", DURABLE, [light]))[0] == [(1,)]


def test_bad_durability_is_rejected() -> None:
    with pytest.raises(ValueError, match="durability"):
        SqliteProvider("x.db", durability="none")  # type: ignore[arg-type]


async def test_committed_work_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    async with SqliteProvider(path) as db:
        await db.enqueue_orchestrator_messages([start("a")])
        item = await fetch_one(db)
        await db.ack_orchestration_items([ack_for(item, history=[started()])])
    async with SqliteProvider(path) as db:
        info = await db.get_instance("a")
        assert info is not None
        assert info.last_event_id == 1


async def test_acknowledged_work_survives_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "kill.db"
    script = (
        "import asyncio, os, sys\n"
        "from perdure_sqlite import SqliteProvider\n"
        "from perdure.history import StartOrchestration\n"
        "async def main():\n"
        "    db = SqliteProvider(sys.argv[1])\n"
        "    await db.open()\n"
        "    for n in range(50):\n"
        "        message = StartOrchestration(instance_id=f'i{n}', name='w', input='1')\n"
        "        await db.enqueue_orchestrator_messages([message])\n"
        "        print(n, flush=True)\n"
        "    os._exit(9)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(path), stdout=subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 9
    acknowledged = len(stdout.split())
    assert acknowledged == 50
    async with SqliteProvider(path) as db:
        assert await db._execute("SELECT count(*) FROM orchestrator_queue") == [(acknowledged,)]


# -- lifecycle ------------------------------------------------------------------------------------


async def test_memory_database_works_and_is_private(tmp_path: Path) -> None:
    async with SqliteProvider(":memory:") as one, SqliteProvider(":memory:") as two:
        await one.enqueue_orchestrator_messages([start("a")])
        assert await two.fetch_orchestration_items(5, LOCK) == []
        assert len(await one.fetch_orchestration_items(5, LOCK)) == 1
        assert not one.capabilities.multi_process


async def test_capabilities(db: SqliteProvider) -> None:
    caps = db.capabilities
    assert caps.wakeups
    assert not caps.cross_process
    assert caps.multi_process == (db.path != ":memory:")
    assert caps.max_payload_bytes == MAX_PAYLOAD_BYTES
    assert db.name == "sqlite"


async def test_close_is_idempotent_and_later_calls_fail_clearly(tmp_path: Path) -> None:
    db = SqliteProvider(tmp_path / "c.db")
    await db.open()
    await db.open()
    await db.close()
    await db.close()
    for call in (
        db.enqueue_orchestrator_messages([start("a")]),
        db.get_instance("a"),
        db.fetch_work_items(1, LOCK),
        db.wait_for_work("orchestrator", 1),
        db.wait_for_instance_change("a", 1),
        db.open(),
    ):
        with pytest.raises(ProviderError, match="closed") as info:
            await call
        assert not info.value.retryable


async def test_close_finishes_operations_already_submitted(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = SqliteProvider(path)
    await db.open()
    pending = [asyncio.create_task(db.enqueue_orchestrator_messages([start(f"i{n}")])) for n in range(50)]
    await asyncio.sleep(0)
    await db.close()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    done = sum(1 for o in outcomes if o is None)
    assert all(o is None or isinstance(o, ProviderError) for o in outcomes)
    async with SqliteProvider(path) as again:
        assert await again._execute("SELECT count(*) FROM orchestrator_queue") == [(done,)]


async def test_first_call_opens_lazily(tmp_path: Path) -> None:
    db = SqliteProvider(tmp_path / "lazy.db")
    try:
        await asyncio.gather(*(db.enqueue_orchestrator_messages([start(f"i{n}")]) for n in range(5)))
        assert len(await db.fetch_orchestration_items(10, LOCK)) == 5
    finally:
        await db.close()


async def test_opening_a_file_that_is_not_a_database_fails_permanently(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a sqlite database, not at all" * 100)
    db = SqliteProvider(path)
    with pytest.raises(ProviderError) as info:
        await db.open()
    assert not info.value.retryable


async def test_a_missing_folder_is_named_in_the_error(tmp_path: Path) -> None:
    db = SqliteProvider(tmp_path / "no" / "such" / "app.db")
    with pytest.raises(ProviderError, match=r"folder '.*no/such' does not exist: create it first") as info:
        await db.open()
    assert not info.value.retryable
    assert not (tmp_path / "no").exists()


async def test_two_providers_on_one_file_share_the_queues_and_respect_locks(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SqliteProvider(path) as one, SqliteProvider(path) as two:
        await one.enqueue_orchestrator_messages([start("a"), start("b")])
        [first] = await one.fetch_orchestration_items(1, LOCK)
        [second] = await two.fetch_orchestration_items(5, LOCK)
        assert {first.instance_id, second.instance_id} == {"a", "b"}
        assert await two.ack_orchestration_items([ack_for(second, history=[started()])]) == [None]
        [error] = await two.ack_orchestration_items([ack_for(first, history=[started()])])
        assert error is None  # the token, not the provider object, holds the lock
        assert await one.get_instance(first.instance_id) is not None


def test_from_url() -> None:
    cases = {
        "sqlite:///app.db": "app.db",
        "sqlite:////tmp/x/app.db": "/tmp/x/app.db",
        "sqlite://:memory:": ":memory:",
        "sqlite:///:memory:": ":memory:",
        "sqlite://": ":memory:",
        "sqlite:///with%20space.db": "with space.db",
        "sqlite+pysqlite:///driver.db": "driver.db",
    }
    for url, path in cases.items():
        assert from_url(url).path == path, url
    provider = from_url("sqlite:///a.db?durability=fast&migrate=false&busy_timeout=2.5")
    assert provider.durability == "fast"
    assert not provider._migrate
    assert provider._busy_timeout == 2.5
    assert from_url("sqlite:///a.db?durability=fast", durability="full").durability == "full"
    for bad, why in (
        ("postgresql://x/y", "not a sqlite URL"),
        ("sqlite://host/a.db", "no host"),
        ("sqlite:///a.db?colour=red", "unknown sqlite URL parameter"),
        ("sqlite:///a.db?migrate=maybe", "not a boolean"),
    ):
        with pytest.raises(ValueError, match=why):
            from_url(bad)


def test_entry_point_is_registered() -> None:
    from importlib.metadata import entry_points

    [ep] = [ep for ep in entry_points(group="perdure.providers") if ep.name == "sqlite"]
    assert ep.load() is from_url


# -- hostile input -------------------------------------------------------------------------------

HOSTILE_IDS = [
    "'; DROP TABLE instances; --",
    'quote"double',
    "percent%_underscore\\backslash",
    "colon:in:the:id",
    "dots.and.7",
    "Hello, 世界! 🎉",
    "tab\tnew\nline",
    "nul\x00byte",
    " ",
    "x" * 1000,
]


@pytest.mark.parametrize("instance_id", HOSTILE_IDS)
async def test_hostile_instance_ids_round_trip_unchanged(db: SqliteProvider, instance_id: str) -> None:
    await db.enqueue_orchestrator_messages([start(instance_id)])
    item = await fetch_one(db)
    assert item.instance_id == instance_id
    assert item.messages[0].instance_id == instance_id
    history = [started(), scheduled(2)]
    ack = ack_for(item, history=history, worker_items=[activity(instance_id, 2)], version="v'1")
    assert await db.ack_orchestration_items([ack]) == [None]
    info = await db.get_instance(instance_id)
    assert info is not None
    assert info.instance_id == instance_id
    assert info.version == "v'1"
    assert [e.event_id for e in await db.read_history(instance_id)] == [1, 2]
    [lease] = await db.fetch_work_items(1, LOCK)
    assert lease.ref.instance_id == instance_id
    assert await db.ack_work_items([WorkItemAck(lease.lock_token, result(instance_id, 2))]) == [None]
    item = await fetch_one(db)
    assert item.instance_id == instance_id
    await db.abandon_orchestration_item(item.lock_token)
    assert await db.get_instance(instance_id + "x") is None
    assert await db._execute("SELECT count(*) FROM instances") == [(1,)]


async def test_an_unstorable_instance_id_is_rejected_permanently(db: SqliteProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await db.enqueue_orchestrator_messages([start("lone \ud800 surrogate")])
    assert not info.value.retryable
    assert await db.fetch_orchestration_items(5, LOCK) == []
    await db.enqueue_orchestrator_messages([start("fine")])  # the provider carries on


async def test_odd_payloads_round_trip(db: SqliteProvider) -> None:
    data = ["", "null", '"Hello, 世界!"', '"\\u0000"', '"' + "y" * 1_000_000 + '"']
    await db.enqueue_orchestrator_messages(
        [RaiseEvent(instance_id="a", name=f"e{n}", data=d) for n, d in enumerate(data)]
    )
    item = await fetch_one(db)
    assert [m.data for m in item.messages if isinstance(m, RaiseEvent)] == data


async def test_a_payload_of_the_declared_maximum_is_stored(file_db: SqliteProvider) -> None:
    big = '"' + "z" * (MAX_PAYLOAD_BYTES - 2) + '"'
    await file_db.enqueue_orchestrator_messages([RaiseEvent(instance_id="a", name="big", data=big)])
    item = await fetch_one(file_db)
    message = item.messages[0]
    assert isinstance(message, RaiseEvent)
    assert message.data == big
