"""Hello, perdure: one orchestration calling one activity, started and awaited through a client.

Run it with ``python examples/hello.py``. It stores its state in a SQLite file in a temporary
directory (deleted at the end) and prints what happens along the way.

The three ideas of perdure are all here:

* an *activity* is an ordinary function that does the real work (I/O, side effects);
* an *orchestration* is an ``async def`` that decides what to do; every step it awaits is
  recorded, so after a crash it resumes where it stopped instead of starting over;
* a *runtime* runs both against a storage *provider*, and a *client* starts and watches them.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime
from perdure_sqlite import SqliteProvider

# A registry names the code a runtime can run. The decorators register each function under its
# own name and return it unchanged.
app = Registry()


@app.activity
def greet(ctx: ActivityContext, name: str) -> str:
    # Activities may do anything: call APIs, write files, talk to databases. A plain `def` runs in
    # a thread pool, an `async def` on the runtime's event loop.
    return f"Hello, {name}!"


@app.orchestration
async def hello(ctx: OrchestrationContext, name: str) -> str:
    # `ctx.call_activity` schedules the activity and records that in history; `await` waits for
    # its result (also recorded). Inputs and results are converted using the annotations.
    greeting = await ctx.call_activity(greet, name)
    return f"{greeting} (from instance {ctx.instance_id})"


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        # The store: one SQLite file (a real application would keep it, e.g. "app.db").
        provider = SqliteProvider(Path(folder) / "hello.db")
        # The runtime opens the provider (creating the schema on first use) and starts fetching
        # work; leaving the block shuts it down gracefully.
        async with Runtime(provider, app) as runtime:
            client = runtime.client
            instance_id = await client.start_orchestration(hello, "world", instance_id="hello-1")
            print(f"started orchestration {instance_id!r}")

            status = await client.wait_for_orchestration(instance_id, timeout=30)
            print(f"status: {status.status}")
            print(f"result: {status.result()}")

            # Everything the orchestration did is in its history: that is what makes it durable.
            # After a crash the runtime replays this record instead of redoing the work.
            history = await client.read_history(instance_id)
            print("history:", ", ".join(event.TYPE for event in history))
        await provider.close()


if __name__ == "__main__":
    asyncio.run(main())
