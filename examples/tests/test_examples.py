"""Run every example as a user would, and check perdure's crash guarantee with real SIGKILLs.

The examples run as subprocesses (``sys.executable examples/NAME.py``) from a foreign working
directory, with ``TMPDIR`` pointed at an empty folder so the test can check they clean up after
themselves. The crash tests drive worker processes (``crash_worker.py``) themselves: they kill a
worker with SIGKILL while an orchestration is half done, start another on the same database, and
count every activity execution.

All waits synchronise on files or on the database, never on sleeps that hope; every timeout is
generous, for a loaded two-core CI machine.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from perdure import Client
from perdure import history as h
from perdure_sqlite import SqliteProvider

EXAMPLES = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("crash_worker.py")
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL and SIGTERM")


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_example(name: str, tmp_path: Path, timeout: float = 120) -> Finished:
    """Run ``examples/NAME.py`` from ``tmp_path``; check it exits 0 and leaves no temp files."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    result = Finished(done.returncode, done.stdout, done.stderr)
    assert result.returncode == 0, (
        f"{name}.py exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    assert list(temp.iterdir()) == [], f"{name}.py left files behind in its temp dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"], f"{name}.py wrote into the working dir"
    return result


# -- the examples ------------------------------------------------------------------------------


def test_hello(tmp_path: Path) -> None:
    out = run_example("hello", tmp_path).stdout
    assert "started orchestration 'hello-1'" in out
    assert "status: completed" in out
    assert "result: Hello, world! (from instance hello-1)" in out
    assert (
        "history: OrchestrationStarted, ActivityScheduled, ActivityCompleted, OrchestrationCompleted" in out
    )


def test_readme_quickstart(tmp_path: Path) -> None:
    """The README's quickstart program runs as printed (from a fresh folder, as a user would)."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md has no python block under its Quickstart heading"
    script = tmp_path / "quickstart.py"
    script.write_text(match.group(1), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['Hello, Ada!', 'Hello, Grace!', 'Hello, Barbara!']"
    assert (tmp_path / "app.db").exists()


def test_fan_out(tmp_path: Path) -> None:
    out = run_example("fan_out", tmp_path).stdout
    # 20 documents of 2 + 3 * i words each, plus the metadata helper after two failed attempts.
    total = sum(2 + 3 * i for i in range(1, 21))
    assert f"result: Report(documents=20, total_words={total}, longest=62" in out
    assert "source=\"ARCHIVE OF 'BATCH-7'\"" in out
    assert out.count("fails (service unavailable)") == 2
    assert "call 3 succeeds" in out
    assert "24 activities scheduled, 2 retry timers" in out


def test_approval(tmp_path: Path) -> None:
    out = run_example("approval", tmp_path).stdout
    assert "[expense-approved] status v1: {'stage': 'waiting for approval', 'amount': 120}" in out
    assert "[expense-approved] status v2: {'stage': 'approved', 'by': 'maria'}" in out
    assert "[expense-approved] completed: approved by maria (looks fine): paid 120 EUR to ann" in out
    assert "[expense-expired] completed: expired after 1 s: told bob the request expired" in out
    assert "[expense-expired] final custom status: {'stage': 'expired'}" in out


def test_saga(tmp_path: Path) -> None:
    out = run_example("saga", tmp_path).stdout
    lisbon, venice = out.split("booking a trip to Venice")
    assert "outcome: booked" in lisbon
    assert "cancel" not in lisbon
    assert "outcome: cancelled" in venice
    assert "because: NoAvailability: no cars in Venice" in venice
    # Compensations ran in reverse order of the reservations, and each exactly once.
    assert venice.index("cancel hotel:Venice") < venice.index("cancel flight:Venice")
    assert venice.count("  cancel ") == 2
    assert "compensated in reverse order: ['hotel:Venice', 'flight:Venice']" in venice


def test_eternal(tmp_path: Path) -> None:
    out = run_example("eternal", tmp_path).stdout
    assert "completed after 5 executions: JobState(generation=6, removed_total=45)" in out
    for generation in range(1, 6):
        assert f"generation {generation} (execution {generation}): removed" in out
    # History stays short: every execution that continued as new has the same few events.
    continued = [line for line in out.splitlines() if line.endswith("OrchestrationContinuedAsNew")]
    assert len(continued) == 4
    assert len({line.split(":")[1] for line in continued}) == 1
    assert "execution 5: " in out
    assert out.rstrip().endswith("ending with OrchestrationCompleted")


@POSIX_ONLY
@pytest.mark.timeout(400)
def test_crash_resume_example(tmp_path: Path) -> None:
    out = run_example("crash_resume", tmp_path, timeout=360).stdout
    assert "parent: orchestration completed: [1, 4, 9, 16, 25, 36]" in out
    # The parent kills the worker once step 4 has started, so steps 1-3 (at least) are done; the
    # example itself asserts that none of them ran again (it would exit non-zero otherwise).
    done = re.search(r"with SIGKILL; steps done by then: (\[[\d, ]*\])", out)
    assert done is not None, out
    steps = ast.literal_eval(done.group(1))
    assert steps[:3] == [1, 2, 3]
    assert len(steps) < 6
    assert f"no finished step ran again: steps {steps} ran exactly once" in out
    assert "stopped gracefully" in out


# -- the crash tests: SIGKILL a worker mid-orchestration, resume on a fresh one -------------------


@dataclass
class Run:
    """One line of the worker journal: an activity execution."""

    step: int
    attempt: int
    pid: int


@dataclass
class Kill:
    """What was true when a worker was killed."""

    pid: int
    workers: set[int]  # pids of every worker started up to this kill (all dead now)
    started: set[int]  # steps that had begun executing (in any worker) by the kill
    completed: set[int]  # steps whose result history had recorded by the kill

    @property
    def in_flight(self) -> set[int]:
        return self.started - self.completed


@dataclass
class Cluster:
    """Worker processes on one database, and the journal they write."""

    database: Path
    journal: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def lines(self) -> list[dict[str, str]]:
        text = self.journal.read_text() if self.journal.exists() else ""
        return [dict(item.split("=", 1) for item in line.split()) for line in text.splitlines()]

    def runs(self) -> list[Run]:
        return [
            Run(int(line["step"]), int(line["attempt"]), int(line["pid"]))
            for line in self.lines()
            if line["kind"] == "step"
        ]

    async def wait_for(self, what: str, predicate: Callable[[list[dict[str, str]]], bool]) -> None:
        """Poll the journal until ``predicate(lines)`` holds; fail fast if the worker died."""
        deadline = time.monotonic() + 120
        while not predicate(self.lines()):
            worker = self.workers[-1]
            assert worker.poll() is None, f"worker exited with {worker.returncode} while waiting for {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    def spawn(self) -> subprocess.Popen[bytes]:
        worker = subprocess.Popen([sys.executable, str(WORKER), str(self.database), str(self.journal)])
        self.workers.append(worker)
        return worker

    async def start_worker(self) -> subprocess.Popen[bytes]:
        """Start a worker process and wait until its runtime is running."""
        worker = self.spawn()
        await self.wait_for(
            f"worker {worker.pid} to start", lambda lines: {"kind": "ready", "pid": str(worker.pid)} in lines
        )
        return worker

    async def step_started(self, n: int) -> None:
        await self.wait_for(
            f"step {n} to start", lambda lines: any(line.get("step") == str(n) for line in lines)
        )

    def kill(self) -> int:
        worker = self.workers[-1]
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=60) == -signal.SIGKILL
        return worker.pid

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "crash.db", tmp_path / "journal.txt")
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[Client]:
    provider = SqliteProvider(cluster.database)
    await provider.open()  # creates the schema before any worker starts
    try:
        yield Client(provider)
    finally:
        await provider.close()


async def completed_steps(client: Client, instance_id: str) -> set[int]:
    """Steps whose ActivityCompleted is in history (step number = the activity's input)."""
    history = await client.read_history(instance_id)
    inputs = {e.event_id: int(e.input) for e in history if isinstance(e, h.ActivityScheduled)}
    return {inputs[e.source_id] for e in history if isinstance(e, h.ActivityCompleted)}


async def kill_now(cluster: Cluster, client: Client, instance_id: str, total: int) -> Kill:
    """SIGKILL the current worker and record what was done; check it really was mid-orchestration."""
    pid = cluster.kill()
    started = {run.step for run in cluster.runs()}
    completed = await completed_steps(client, instance_id)
    status = await client.get_status(instance_id)
    assert status is not None
    assert status.status == "running", "the orchestration finished before the kill"
    assert completed, "the kill came before any step had completed"
    assert len(completed) < total, "the kill came after every step had completed"
    assert completed <= started
    assert len(started - completed) <= 1, "steps run one at a time"
    return Kill(pid, {worker.pid for worker in cluster.workers}, started, completed)


@POSIX_ONLY
@pytest.mark.timeout(400)
async def test_sigkill_mid_activity_twice_reruns_only_the_activities_in_flight(
    cluster: Cluster, client: Client
) -> None:
    total = 10
    instance_id = await client.start_orchestration("steps", total, instance_id="crash-twice")

    await cluster.start_worker()
    await cluster.step_started(3)
    first = await kill_now(cluster, client, instance_id, total)

    await cluster.start_worker()
    await cluster.step_started(7)
    second = await kill_now(cluster, client, instance_id, total)
    assert first.completed < second.completed

    await cluster.start_worker()
    status = await client.wait_for_orchestration(instance_id, timeout=240)
    assert status.status == "completed"
    assert status.result() == [n * n for n in range(1, total + 1)]

    runs = cluster.runs()
    executions = {n: [run for run in runs if run.step == n] for n in range(1, total + 1)}
    for kill in (first, second):
        # A step whose result was recorded before a kill never runs again in a later worker.
        later = [run for run in runs if run.step in kill.completed and run.pid not in kill.workers]
        assert later == [], f"completed steps ran again after the kill of {kill.pid}: {later}"
    may_rerun = first.in_flight | second.in_flight
    for n, done in executions.items():
        if n in may_rerun:
            # In flight at a kill: its result was never recorded, so it ran again (at-least-once),
            # as a new attempt of the same work item.
            assert 1 <= len(done) <= 2, f"step {n} ran {len(done)} times"
            assert [run.attempt for run in done] == list(range(1, len(done) + 1))
        else:
            assert len(done) == 1, f"step {n} ran {len(done)} times"
    # In particular: every step that had completed before the first kill ran exactly once.
    assert all(len(executions[n]) == 1 for n in first.completed)


@POSIX_ONLY
@pytest.mark.timeout(400)
async def test_sigkill_during_a_durable_timer_resumes_the_same_timer(
    cluster: Cluster, client: Client
) -> None:
    instance_id = await client.start_orchestration("step_sleep_step", 2.0, instance_id="crash-timer")
    await cluster.start_worker()

    # Wait (on the database) until step 1 is recorded and the timer is created, then kill.
    deadline = time.monotonic() + 120
    while not any(isinstance(e, h.TimerCreated) for e in await client.read_history(instance_id)):
        assert time.monotonic() < deadline, "the timer was never created"
        await asyncio.sleep(0.02)
    cluster.kill()
    at_kill = await client.read_history(instance_id)
    assert await completed_steps(client, instance_id) == {1}
    (timer,) = [e for e in at_kill if isinstance(e, h.TimerCreated)]

    await cluster.start_worker()
    status = await client.wait_for_orchestration(instance_id, timeout=240)
    assert status.result() == [1, 4]

    # No activity ran twice, and the timer was not re-created: the new worker resumed it.
    assert sorted(run.step for run in cluster.runs()) == [1, 2]
    final = await client.read_history(instance_id)
    assert final[: len(at_kill)] == at_kill
    assert [e for e in final if isinstance(e, h.TimerCreated)] == [timer]
    (fired,) = [e for e in final if isinstance(e, h.TimerFired)]
    assert fired.source_id == timer.event_id
    assert fired.timestamp_ms >= timer.fire_at_ms
