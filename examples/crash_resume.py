"""Crash and resume: kill a worker process mid-orchestration, start another, lose no finished work.

This script plays two roles:

* the **parent** (``python examples/crash_resume.py``) is like a web application: it only uses a
  client. It starts a six-step ``pipeline`` orchestration, launches a **worker** process that runs
  it, kills that worker with SIGKILL while step 4 is running (no cleanup, no graceful shutdown, as
  in a power cut or an OOM kill), then launches a second worker on the same database;
* a **worker** (``crash_resume.py worker DB JOURNAL``) runs a perdure runtime until SIGTERM.

Every activity execution appends a line to a journal file, so afterwards we can count how often
each step really ran. The second worker resumes from history: steps 1-3 are not run again; the
orchestration continues from where it was. Step 4, in flight when the worker died, runs a second
time: its lease expired, and an activity whose result was never recorded must be retried.
That is perdure's contract: orchestration steps are exactly-once, activities at-least-once (make
them idempotent).

POSIX only (SIGKILL). Run it with ``python examples/crash_resume.py``; it takes a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _common import temp_database

from perdure import ActivityContext, Client, OrchestrationContext, Registry, Runtime, RuntimeOptions
from perdure import history as h
from perdure_sqlite import SqliteProvider

app = Registry()

STEPS = 6
KILL_WHILE_RUNNING = 4  # the parent kills the first worker once this step has started
STEP_SECONDS = 0.5  # how long each step "works"

#: Short leases so the second worker takes over the killed worker's activity within seconds
#: (the default, 30 s, suits production: a lease is renewed every third of it while running).
WORKER_OPTIONS = RuntimeOptions(activity_lock_timeout=3.0, orchestration_lock_timeout=3.0, poll_interval=0.2)

#: Set in the worker process from its command line.
JOURNAL: Path | None = None


@app.activity
def process_step(ctx: ActivityContext, step: int) -> int:
    assert JOURNAL is not None
    # Record the execution first, so that even an execution cut short by the kill is counted.
    with JOURNAL.open("a") as journal:
        journal.write(f"step={step} attempt={ctx.attempt} pid={os.getpid()}\n")
    print(f"  [worker {os.getpid()}] step {step} started (attempt {ctx.attempt})", flush=True)
    time.sleep(STEP_SECONDS)  # the real work would happen here
    return step * step


@app.orchestration
async def pipeline(ctx: OrchestrationContext, steps: int) -> list[int]:
    results = []
    for step in range(1, steps + 1):
        results.append(await ctx.call_activity(process_step, step))
    return results


# -- the worker process -----------------------------------------------------------------------


async def run_worker(database: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    provider = SqliteProvider(database)
    async with Runtime(provider, app, WORKER_OPTIONS):
        print(f"  [worker {os.getpid()}] running", flush=True)
        await stop.wait()  # SIGTERM: leave the block, which shuts the runtime down gracefully
    await provider.close()
    print(f"  [worker {os.getpid()}] stopped gracefully", flush=True)


# -- the parent process -----------------------------------------------------------------------


def start_worker(database: Path, journal: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "worker", str(database), str(journal)])


def executions(journal: Path) -> list[dict[str, int]]:
    """Parse the journal: one dict per activity execution."""
    lines = journal.read_text().splitlines() if journal.exists() else []
    return [{k: int(v) for k, v in (field.split("=") for field in line.split())} for line in lines]


async def wait_until_step_started(journal: Path, step: int, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not any(run["step"] == step for run in executions(journal)):
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited early with code {worker.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step} did not start within 120 s")
        await asyncio.sleep(0.02)


async def completed_steps(client: Client, instance_id: str) -> set[int]:
    """Return the steps whose results history has recorded: those never run again."""
    history = await client.read_history(instance_id)
    inputs = {e.event_id: int(e.input) for e in history if isinstance(e, h.ActivityScheduled)}
    return {inputs[e.source_id] for e in history if isinstance(e, h.ActivityCompleted)}


async def main() -> None:
    with temp_database() as database:
        journal = database.with_name("journal.txt")
        provider = SqliteProvider(database)
        await provider.open()  # creates the schema; the workers find it ready
        client = Client(provider)  # the parent only needs a client, no runtime
        workers: list[subprocess.Popen[bytes]] = []
        try:
            instance_id = await client.start_orchestration(pipeline, STEPS, instance_id="pipeline")
            print(f"parent: started {instance_id!r} with {STEPS} steps")

            workers.append(start_worker(database, journal))
            await wait_until_step_started(journal, KILL_WHILE_RUNNING, workers[-1])
            os.kill(workers[-1].pid, signal.SIGKILL)
            workers[-1].wait()
            done = await completed_steps(client, instance_id)
            print(f"parent: killed worker {workers[-1].pid} with SIGKILL; steps done by then: {sorted(done)}")

            workers.append(start_worker(database, journal))
            print("parent: started a second worker on the same database")
            status = await client.wait_for_orchestration(instance_id, timeout=120)
            print(f"parent: orchestration {status.status}: {status.result()}")
            workers[-1].send_signal(signal.SIGTERM)
            workers[-1].wait(timeout=60)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
            await provider.close()

        runs = Counter(run["step"] for run in executions(journal))
        print("executions per step:", ", ".join(f"step {step}: {runs[step]}" for step in range(1, STEPS + 1)))
        assert status.result() == [step * step for step in range(1, STEPS + 1)]
        assert all(runs[step] == 1 for step in done), "a step finished before the crash ran again"
        rerun = [step for step in range(1, STEPS + 1) if runs[step] > 1]
        assert len(rerun) <= 1, "only the step in flight at the kill may run again"
        assert all(runs[step] == 2 for step in rerun)
        print(f"no finished step ran again: steps {sorted(done)} ran exactly once")
        if rerun:
            print(
                f"step {rerun[0]} ran twice: it was in flight when the worker died, its result was never "
                "recorded, so it was retried once its lease expired (activities are at-least-once)"
            )


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        JOURNAL = Path(sys.argv[3])
        asyncio.run(run_worker(Path(sys.argv[2])))
    else:
        asyncio.run(main())
