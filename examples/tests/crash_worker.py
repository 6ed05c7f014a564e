"""A worker process for the crash tests: ``python crash_worker.py DB JOURNAL``.

Runs a perdure runtime on the SQLite database ``DB`` until SIGTERM. Every activity execution
appends one line to ``JOURNAL`` before doing its work, so the test can count executions exactly,
including one cut short by SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime, RuntimeOptions
from perdure_sqlite import SqliteProvider

app = Registry()

#: Seconds each step works: long enough that a kill lands inside one, short enough to be quick.
STEP_SECONDS = 0.3
#: Short leases so a dead worker's activity is retried within seconds of the restart.
OPTIONS = RuntimeOptions(activity_lock_timeout=3.0, orchestration_lock_timeout=3.0, poll_interval=0.2)

JOURNAL = Path(sys.argv[2]) if len(sys.argv) > 2 else None


def record(**fields: object) -> None:
    assert JOURNAL is not None
    line = " ".join(f"{key}={value}" for key, value in fields.items())
    with JOURNAL.open("a") as journal:
        journal.write(line + "\n")


@app.activity
def step(ctx: ActivityContext, n: int) -> int:
    record(kind="step", step=n, attempt=ctx.attempt, pid=os.getpid())
    time.sleep(STEP_SECONDS)
    return n * n


@app.orchestration
async def steps(ctx: OrchestrationContext, count: int) -> list[int]:
    """Run ``count`` steps one after the other."""
    return [await ctx.call_activity(step, n) for n in range(1, count + 1)]


@app.orchestration
async def step_sleep_step(ctx: OrchestrationContext, seconds: float) -> list[int]:
    """A step, a durable timer of ``seconds``, another step."""
    first = await ctx.call_activity(step, 1)
    await ctx.sleep(seconds)
    second = await ctx.call_activity(step, 2)
    return [first, second]


async def main(database: Path) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    provider = SqliteProvider(database)
    async with Runtime(provider, app, OPTIONS):
        record(kind="ready", pid=os.getpid())
        await stop.wait()
    await provider.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
