"""Several runtime processes sharing one PostgreSQL schema, with and without a SIGKILL.

Real processes (``multiprocess_worker.py`` under ``sys.executable``; one of them runs without an
orchestration cache, so every turn it takes replays history), a real server, a fresh schema per
test. This process is only a client: it starts the orchestrations and inspects the database.
Activity executions are counted from per-process journal files the activities append to before
they work, so an execution cut short by SIGKILL is counted too.

What is checked, from the database and the journals:

* every orchestration completed exactly once (one execution, one ``OrchestrationCompleted``) with
  the expected output, and every activity call has exactly one recorded result;
* without a crash, every scheduled activity call ran exactly once;
* with one of three processes killed midway, the survivors finish its work once its leases
  expire, and the only activity calls that ran twice (never more) are the ones the killed process
  had started and not committed when it died.

The server comes from ``PERDURE_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
the tests skip loudly without one, and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiprocess_worker as worker
import psycopg
import pytest
from psycopg import sql

from perdure import Client, connect
from perdure import history as h
from perdure.serialization import loads

PG_URL = os.environ.get("PERDURE_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"

WORKER_SCRIPT = Path(worker.__file__).resolve()
PROCESSES = 3
ORCHESTRATIONS = 500
#: Activities per orchestration (double, then square and add in parallel).
ACTIVITIES = 3
#: Instance lock and activity lease of the workers, seconds: short, so a crash heals quickly.
LEASE = 3.0
#: Generous bound for anything we wait for (the machine may be slow and busy).
WAIT = 90.0

Call = tuple[str, int]  # (instance_id, activity_id): one scheduled activity call


# -- the server and the schema ------------------------------------------------------------------


def _require_server() -> None:
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        message = (
            f"PostgreSQL is not reachable at PERDURE_PG_URL={PG_URL!r} ({reason}). "
            "The perdure-postgres multi-process tests did NOT run."
        )
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL: {message}", pytrace=False)
        pytest.skip(f"!!! SKIPPED: {message}")


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema name, dropped (with everything in it) after the test."""
    _require_server()
    name = f"mp_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


# -- the runtime processes ----------------------------------------------------------------------


@dataclass
class Cluster:
    """The runtime processes of one test; :meth:`stop` leaves none behind."""

    schema: str
    directory: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, count: int) -> None:
        for index in range(count):
            log = (self.directory / f"worker-{index}.out").open("wb")
            with log:
                self.processes[index] = subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER_SCRIPT),
                        PG_URL,
                        self.schema,
                        str(self.directory),
                        str(index),
                        str(LEASE),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )

    def kill(self, index: int) -> int:
        """SIGKILL one process (no cleanup of any kind) and reap it; returns its pid."""
        process = self.processes[index]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return process.pid

    def freeze(self, index: int, directory: Path) -> set[Call]:
        """SIGSTOP one process; return the activity calls it was in the middle of (per its journal)."""
        process = self.processes[index]
        os.kill(process.pid, signal.SIGSTOP)
        _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once it has really stopped
        assert os.WIFSTOPPED(status), status
        runs, ended = journal(directory)
        return {r.call for r in runs if r.pid == process.pid and (r.pid, r.call) not in ended}

    def thaw(self, index: int) -> None:
        os.kill(self.processes[index].pid, signal.SIGCONT)

    def check_alive(self, *, except_: tuple[int, ...] = ()) -> None:
        for index, process in self.processes.items():
            if index not in except_ and process.poll() is not None:
                raise AssertionError(
                    f"runtime process {index} exited with code {process.returncode}:\n{self.output(index)}"
                )

    def output(self, index: int) -> str:
        text = (self.directory / f"worker-{index}.out").read_text(errors="replace")
        return text[-4000:]

    def stop(self) -> None:
        """SIGTERM every live process (graceful shutdown), SIGKILL what is left after a while."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class Run:
    """One activity execution, as journaled by the process that ran it."""

    pid: int
    call: Call
    name: str
    attempt: int


def journal(directory: Path) -> tuple[list[Run], set[tuple[int, Call]]]:
    """Every activity execution started so far, and those (pid, call) that also finished working."""
    runs: list[Run] = []
    ended: set[tuple[int, Call]] = set()
    for path in sorted(directory.glob("journal-*.log")):
        for line in path.read_text().splitlines():
            what, pid, instance_id, activity_id, name, attempt = line.split(" ")
            call = (instance_id, int(activity_id))
            if what == "start":
                runs.append(Run(int(pid), call, name, int(attempt)))
            else:
                ended.add((int(pid), call))
    return runs, ended


# -- the database -------------------------------------------------------------------------------


def table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


@dataclass
class Database:
    """The test's own connection, for watching and checking the schema's tables."""

    conn: psycopg.AsyncConnection[Any]
    schema: str

    async def query(self, template: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement; ``{executions}``, ``{history}`` etc. name the schema's tables."""
        names = ("executions", "history", "orchestrator_queue", "worker_queue", "instance_locks")
        statement = sql.SQL(template).format(**{n: table(self.schema, n) for n in names})
        cursor = await self.conn.execute(statement, params or {})
        return await cursor.fetchall() if cursor.description else []


@pytest.fixture
async def db(schema: str) -> AsyncIterator[Database]:
    """An autocommit connection watching ``schema``."""
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        yield Database(conn, schema)


async def terminal_counts(db: Database) -> tuple[int, int]:
    """(completed, failed or cancelled) executions."""
    rows = await db.query(
        "SELECT count(*) FILTER (WHERE status = 'completed'),"
        " count(*) FILTER (WHERE status IN ('failed', 'cancelled')) FROM {executions}",
    )
    return int(rows[0][0]), int(rows[0][1])


async def wait_until_connected(db: Database, cluster: Cluster, indexes: range) -> None:
    """Wait until every runtime process has its connections open (seen in pg_stat_activity)."""
    names = [worker.application_name(cluster.schema, i) for i in indexes]
    deadline = time.monotonic() + WAIT
    while True:
        rows = await db.query(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE application_name = ANY(%(n)s)",
            {"n": names},
        )
        if len(rows) == len(names):
            return
        cluster.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"runtime processes did not connect within {WAIT} s: {rows}")
        await asyncio.sleep(0.05)


async def wait_until_gone(db: Database, name: str) -> None:
    """Wait until the server has no backend left for ``name`` (after its process was killed)."""
    deadline = time.monotonic() + WAIT
    while True:
        rows = await db.query("SELECT pid FROM pg_stat_activity WHERE application_name = %(n)s", {"n": name})
        if not rows:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"backends of {name} still there {WAIT} s after SIGKILL: {rows}")
        await asyncio.sleep(0.02)


async def wait_for_all(db: Database, cluster: Cluster, *, dead: tuple[int, ...] = ()) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        completed, failed = await terminal_counts(db)
        assert failed == 0, f"{failed} orchestrations failed or were cancelled"
        if completed == ORCHESTRATIONS:
            return
        cluster.check_alive(except_=dead)
        if time.monotonic() > deadline:
            raise AssertionError(f"only {completed} of {ORCHESTRATIONS} orchestrations completed in {WAIT} s")
        await asyncio.sleep(0.1)


async def start_all(schema: str) -> None:
    provider = connect(PG_URL, schema=schema, max_pool_size=4)
    await provider.open()
    try:
        client = Client(provider, worker.app)
        ids = await asyncio.gather(
            *(
                client.start_orchestration(worker.job, n, instance_id=f"job-{n:03d}")
                for n in range(ORCHESTRATIONS)
            )
        )
        assert len(set(ids)) == ORCHESTRATIONS
    finally:
        await provider.close()


async def migrate(schema: str) -> None:
    """Create the schema as a deploy step would; the runtime processes open with migrate=False."""
    provider = connect(PG_URL, schema=schema, max_pool_size=1)
    await provider.open()
    await provider.close()


async def check_history(db: Database) -> set[Call]:
    """Assert every instance completed exactly once, correctly; return the scheduled calls."""
    executions = await db.query("SELECT instance_id, execution_id, status, output FROM {executions}")
    assert len(executions) == ORCHESTRATIONS
    for instance_id, execution_id, status, output in executions:
        n = int(instance_id.removeprefix("job-"))
        assert (execution_id, status) == (1, "completed"), instance_id
        assert loads(output) == worker.expected_output(n), instance_id

    scheduled: set[Call] = set()
    results: Counter[Call] = Counter()
    completions: Counter[str] = Counter()
    timers: Counter[str] = Counter()
    for instance_id, data in await db.query("SELECT instance_id, data FROM {history}"):
        event = h.decode_event(data)
        if isinstance(event, h.ActivityScheduled):
            scheduled.add((instance_id, event.event_id))
        elif isinstance(event, h.ActivityCompleted):
            results[(instance_id, event.source_id)] += 1
        elif isinstance(event, h.OrchestrationCompleted):
            completions[instance_id] += 1
        elif isinstance(event, h.TimerFired):
            timers[instance_id] += 1
        else:
            assert not isinstance(event, h.ActivityFailed | h.OrchestrationFailed), (instance_id, event)
    assert len(completions) == ORCHESTRATIONS and set(completions.values()) == {1}
    assert len(timers) == ORCHESTRATIONS and set(timers.values()) == {1}
    assert len(scheduled) == ORCHESTRATIONS * ACTIVITIES
    assert set(results) == scheduled and set(results.values()) == {1}
    return scheduled


async def check_drained(db: Database) -> None:
    """Nothing is left in the queues or locked once every instance has completed."""
    deadline = time.monotonic() + 30
    while True:
        rows = await db.query(
            "SELECT (SELECT count(*) FROM {orchestrator_queue}), (SELECT count(*) FROM {worker_queue}),"
            " (SELECT count(*) FROM {instance_locks})",
        )
        if rows[0] == (0, 0, 0):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left over (orchestrator queue, worker queue, locks): {rows[0]}")
        await asyncio.sleep(0.1)


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_three_processes_run_every_step_exactly_once(schema: str, db: Database, tmp_path: Path) -> None:
    await migrate(schema)
    cluster = Cluster(schema, tmp_path)
    try:
        cluster.start(PROCESSES)
        await wait_until_connected(db, cluster, range(PROCESSES))
        await start_all(schema)
        await wait_for_all(db, cluster)
        await check_drained(db)
    finally:
        cluster.stop()

    scheduled = await check_history(db)
    runs, _ = journal(tmp_path)
    counts = Counter(run.call for run in runs)
    assert set(counts) == scheduled
    repeated = {call: n for call, n in counts.items() if n != 1}
    assert not repeated, f"activity calls that ran more than once without any crash: {repeated}"
    assert all(run.attempt == 1 for run in runs)
    pids = {process.pid for process in cluster.processes.values()}
    assert {run.pid for run in runs} == pids, "every process should have run some activities"
    print(f"activity runs per process: {sorted(Counter(run.pid for run in runs).values())}")
    for index, process in cluster.processes.items():
        assert process.returncode == 0, f"process {index} did not shut down cleanly:\n{cluster.output(index)}"


@pytest.mark.timeout(150)
async def test_survivors_finish_the_work_of_a_killed_process(
    schema: str, db: Database, tmp_path: Path
) -> None:
    await migrate(schema)
    cluster = Cluster(schema, tmp_path)
    try:
        cluster.start(PROCESSES)
        await wait_until_connected(db, cluster, range(PROCESSES))
        await start_all(schema)

        # Midway: some orchestrations done, and the victim running activities right now. Each
        # candidate is frozen (SIGSTOP) while its journal is read, so what it is running cannot
        # finish between the look and the kill; one that runs nothing is thawed, the next tried.
        deadline = time.monotonic() + WAIT
        victim = -1
        running: set[Call] = set()
        while True:
            completed, _ = await terminal_counts(db)
            assert completed < ORCHESTRATIONS, "the workload finished before a process could be killed"
            if completed >= ORCHESTRATIONS // 5:
                for index in range(PROCESSES):
                    running = cluster.freeze(index, tmp_path)
                    if running:
                        victim = index
                        break
                    cluster.thaw(index)
            if victim >= 0:
                break
            cluster.check_alive()
            assert time.monotonic() < deadline, f"{completed} completed, and no process is running anything"
            await asyncio.sleep(0.02)
        victim_pid = cluster.processes[victim].pid
        cluster.kill(victim)

        # Once the server has dropped the victim's backends, nothing it did can still commit:
        # the worker rows still there are exactly the activities it had leased and not acked.
        await wait_until_gone(db, worker.application_name(schema, victim))
        completed_at_kill, _ = await terminal_counts(db)
        unacked = {
            (instance_id, int(activity_id))
            for instance_id, activity_id in await db.query(
                "SELECT instance_id, activity_id FROM {worker_queue}"
            )
        }
        runs_at_kill, _ = journal(tmp_path)

        await wait_for_all(db, cluster, dead=(victim,))
        await check_drained(db)
    finally:
        cluster.stop()

    assert 0 < completed_at_kill < ORCHESTRATIONS
    scheduled = await check_history(db)
    runs, _ = journal(tmp_path)
    counts = Counter(run.call for run in runs)
    assert set(counts) == scheduled

    by_victim = {run.call for run in runs_at_kill if run.pid == victim_pid}
    assert by_victim, "the killed process had run no activity"
    in_flight = by_victim & unacked
    assert running <= in_flight, f"running at the kill yet not left in the queue: {running - in_flight}"
    assert {run.call for run in runs if run.pid == victim_pid} == by_victim, "a killed process ran on"

    repeated = {call for call, n in counts.items() if n > 1}
    print(
        f"killed pid {victim_pid} with {completed_at_kill} of {ORCHESTRATIONS} orchestrations done; "
        f"it had run {len(by_victim)} activities, {len(in_flight)} in flight; {len(repeated)} ran twice; "
        f"runs per process: {dict(Counter(run.pid for run in runs))}"
    )
    assert max(counts.values()) <= 2
    assert repeated == in_flight, (
        f"ran twice but not in flight at the kill: {sorted(repeated - in_flight)[:10]}; "
        f"in flight at the kill but not run again: {sorted(in_flight - repeated)[:10]}"
    )
    for call in repeated:
        first, second = sorted((run for run in runs if run.call == call), key=lambda run: run.attempt)
        assert (first.pid, first.attempt) == (victim_pid, 1), (call, first)
        assert second.pid != victim_pid and second.attempt == 2, (call, second)
    for run in runs:
        # A call leased (not yet started) by the victim runs once, elsewhere, on attempt 2.
        assert run.call in repeated or run.attempt == 1 or run.call in unacked, run
