"""Eternal orchestration: a periodic job that restarts itself with ``ctx.continue_as_new``.

A cleanup job runs, sleeps on a durable timer, and runs again, forever in a real service (here:
five generations, 0.2 s apart). Written as a ``while True`` loop, its history would grow by a few
events per round, and every replay after a restart would get slower. Instead each round ends with
``ctx.continue_as_new(next_state)``: the execution ends, a new one of the same instance starts
with that input and an empty history, and the execution id goes up by one. The instance id stays
the same, so clients keep following it.

Run it with ``python examples/eternal.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from _common import DEMO_OPTIONS, temp_database

from perdure import ActivityContext, OrchestrationContext, Registry, Runtime
from perdure_sqlite import SqliteProvider

app = Registry()

GENERATIONS = 5
INTERVAL_SECONDS = 0.2


@dataclass
class JobState:
    """Everything the next generation needs: it is the input of the next execution."""

    generation: int = 1
    removed_total: int = 0


@app.activity
def remove_expired_sessions(ctx: ActivityContext, generation: int) -> int:
    removed = generation * 3  # pretend we deleted some rows
    print(f"  generation {generation} (execution {ctx.execution_id}): removed {removed} sessions")
    return removed


@app.orchestration
async def cleanup_job(ctx: OrchestrationContext, state: JobState) -> JobState:
    removed = await ctx.call_activity(remove_expired_sessions, state.generation)
    state = JobState(state.generation + 1, state.removed_total + removed)
    ctx.set_custom_status({"generations_done": state.generation - 1, "removed_total": state.removed_total})
    if state.generation > GENERATIONS:
        return state  # a real eternal job would never stop; this one ends so the demo can
    # A durable timer: in production this could be an hour, or a day.
    await ctx.sleep(INTERVAL_SECONDS)
    # Never returns: ends this execution and starts the next one with `state` as its input.
    ctx.continue_as_new(state)


async def main() -> None:
    with temp_database() as path:
        provider = SqliteProvider(path)
        async with Runtime(provider, app, DEMO_OPTIONS) as runtime:
            client = runtime.client
            instance_id = await client.start_orchestration(cleanup_job, JobState(), instance_id="cleanup")
            print(f"started {instance_id!r}")
            status = await client.wait_for_orchestration(instance_id, timeout=60)
            print(f"{status.status} after {status.execution_id} executions: {status.result(JobState)}")
            print(f"custom status: {status.custom_status_value()}")

            # Each execution has its own short history; the instance's history never grows.
            for execution_id in range(1, status.execution_id + 1):
                history = await client.read_history(instance_id, execution_id)
                print(f"  execution {execution_id}: {len(history)} events, ending with {history[-1].TYPE}")
        await provider.close()


if __name__ == "__main__":
    asyncio.run(main())
