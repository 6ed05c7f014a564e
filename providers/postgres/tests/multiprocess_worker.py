"""A runtime process for ``test_multiprocess.py``: the workload's code, run until SIGTERM.

    python multiprocess_worker.py URL SCHEMA JOURNAL_DIR INDEX LEASE_SECONDS

runs ``Runtime(connect(URL, schema=SCHEMA, migrate=False), app, RuntimeOptions(...))`` with
``LEASE_SECONDS`` as both lock timeouts (and process ``UNCACHED_INDEX`` without an orchestration
cache), until SIGTERM (graceful shutdown) or until its parent dies. Its connections carry the
application name :func:`application_name` so the test can watch them in ``pg_stat_activity``.

Every activity execution is journaled before the activity works: one line appended to
``JOURNAL_DIR/journal-<INDEX>-<pid>.log`` with a single ``write(2)`` on an ``O_APPEND`` descriptor,
so the line is in the kernel's hands (and survives SIGKILL) the moment the call returns. A second
line marks the end of the activity's work, which lets the test see which activities are running
in a process right now. Line format: ``<start|end> <pid> <instance_id> <activity_id> <name>
<attempt>``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime, RuntimeOptions, connect

app = Registry()

#: How long each activity "works": long enough that a process always has activities in flight.
ACTIVITY_SECONDS = 0.05
#: The durable timer between the first activity and the parallel pair.
TIMER_SECONDS = 0.2

#: The runtime process that runs with its orchestration cache disabled.
UNCACHED_INDEX = 2

_journal_fd: int | None = None


def application_name(schema: str, index: int) -> str:
    """The ``application_name`` of runtime process ``index`` on ``schema``."""
    return f"{schema}-w{index}"


def expected_output(n: int) -> list[int]:
    """What ``job(n)`` returns."""
    return [n, 2 * n, 4 * n * n, 3 * n]


def _journal(ctx: ActivityContext, what: str) -> None:
    assert _journal_fd is not None, "the journal is opened by main()"
    line = f"{what} {os.getpid()} {ctx.instance_id} {ctx.activity_id} {ctx.name} {ctx.attempt}\n"
    os.write(_journal_fd, line.encode())


@app.activity
def double(ctx: ActivityContext, n: int) -> int:
    """A sync activity (runs in the thread pool)."""
    _journal(ctx, "start")
    time.sleep(ACTIVITY_SECONDS)
    _journal(ctx, "end")
    return 2 * n


@app.activity
async def square(ctx: ActivityContext, n: int) -> int:
    """An async activity (runs on the runtime's loop)."""
    _journal(ctx, "start")
    await asyncio.sleep(ACTIVITY_SECONDS)
    _journal(ctx, "end")
    return n * n


@app.activity
def add(ctx: ActivityContext, pair: list[int]) -> int:
    """A sync activity with a structured input."""
    _journal(ctx, "start")
    time.sleep(ACTIVITY_SECONDS)
    _journal(ctx, "end")
    return pair[0] + pair[1]


@app.orchestration
async def job(ctx: OrchestrationContext, n: int) -> list[int]:
    """One activity, a durable timer, then two activities in parallel."""
    a = await ctx.call_activity(double, n)
    await ctx.sleep(TIMER_SECONDS)
    b, c = await ctx.all([ctx.call_activity(square, a), ctx.call_activity(add, [n, a])])
    return [n, a, b, c]


async def _orphaned(parent: int) -> None:
    """Return when the process that started us is gone (no stray workers if the test dies)."""
    while True:
        if os.getppid() != parent:
            return
        await asyncio.sleep(0.5)


async def serve(url: str, schema: str, index: int, lease: float) -> None:
    """Run a runtime until SIGTERM or until the parent process dies."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    provider = connect(
        url, schema=schema, migrate=False, max_pool_size=4, application_name=application_name(schema, index)
    )
    options = RuntimeOptions(
        # The last process keeps no live orchestrations: every turn it runs replays history, so
        # cached and uncached runtimes share instances (results must be the same either way).
        cache_size=0 if index == UNCACHED_INDEX else RuntimeOptions().cache_size,
        orchestration_lock_timeout=lease,
        activity_lock_timeout=lease,
        poll_interval=0.5,
        shutdown_timeout=2.0,
    )
    runtime = Runtime(provider, app, options)
    orphaned = asyncio.ensure_future(_orphaned(os.getppid()))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await runtime.start()
        await asyncio.wait([orphaned, stopped], return_when=asyncio.FIRST_COMPLETED)
        await runtime.shutdown()
    finally:
        orphaned.cancel()
        stopped.cancel()
        await provider.close()


def main(argv: list[str]) -> int:
    """Parse the command line, open the journal and serve."""
    global _journal_fd
    url, schema, journal_dir, index_text, lease_text = argv
    index = int(index_text)
    path = Path(journal_dir) / f"journal-{index}-{os.getpid()}.log"
    _journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        asyncio.run(serve(url, schema, index, float(lease_text)))
    finally:
        os.close(_journal_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
