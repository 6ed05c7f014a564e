"""Fan-out/fan-in: run many activities at once with ``ctx.all`` and combine their results.

The orchestration counts the words of a batch of documents. It schedules one ``count_words``
activity per document, all at once, and joins them. Next to them it runs a helper ``async def``
(an "async block") that fetches the batch's metadata from a flaky service with its own retry
policy; ``ctx.all`` accepts the helper's coroutine like any durable call, and runs it as its own
durable task.

Run it with ``python examples/fan_out.py``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from _common import DEMO_OPTIONS, temp_database

from perdure import ActivityContext, OrchestrationContext, Registry, RetryPolicy, Runtime
from perdure_sqlite import SqliteProvider

app = Registry()

DOCUMENTS = [f"document {i} " + "lorem ipsum dolor " * i for i in range(1, 21)]


@dataclass
class Report:
    """What the orchestration returns."""

    documents: int
    total_words: int
    longest: int
    source: str


@app.activity
def count_words(ctx: ActivityContext, text: str) -> int:
    return len(text.split())


# A flaky dependency: the first two calls fail, the third succeeds. (A module-level counter is
# fine for a demo in one process; real activities would call a real service.)
_metadata_calls = 0
_metadata_lock = threading.Lock()


@app.activity
def fetch_metadata(ctx: ActivityContext, batch: str) -> str:
    global _metadata_calls
    with _metadata_lock:
        _metadata_calls += 1
        call = _metadata_calls
    if call < 3:
        print(f"  fetch_metadata: call {call} fails (service unavailable)")
        raise ConnectionError("metadata service unavailable")
    print(f"  fetch_metadata: call {call} succeeds")
    return f"archive of {batch!r}"


@app.activity
def normalise(ctx: ActivityContext, source: str) -> str:
    return source.upper()


async def describe_batch(ctx: OrchestrationContext, batch: str) -> str:
    """Fetch and normalise the batch's metadata: two durable steps, the first one retried."""
    policy = RetryPolicy(
        max_attempts=5,
        backoff="exponential",  # waits 0.1 s, then 0.2 s, ... (durable timers, not sleeps)
        delay=0.1,
        non_retryable=["ValueError"],  # a bad request would fail at once
    )
    raw = await ctx.call_activity(fetch_metadata, batch, retry=policy)
    return str(await ctx.call_activity(normalise, raw))


@app.orchestration
async def word_count(ctx: OrchestrationContext, documents: list[str]) -> Report:
    # Fan out: every call is scheduled now; nothing runs until the orchestration awaits.
    counts = [ctx.call_activity(count_words, text) for text in documents]
    # Fan in: one join over the activities *and* the helper's coroutine. Results come back in
    # argument order; if any of them failed, the first failure (in history order) is raised here.
    *words, source = await ctx.all([*counts, describe_batch(ctx, "batch-7")])
    return Report(documents=len(words), total_words=sum(words), longest=max(words), source=source)


async def main() -> None:
    with temp_database() as path:
        provider = SqliteProvider(path)
        async with Runtime(provider, app, DEMO_OPTIONS) as runtime:
            client = runtime.client
            instance_id = await client.start_orchestration(word_count, DOCUMENTS)
            print(f"started word_count over {len(DOCUMENTS)} documents")
            status = await client.wait_for_orchestration(instance_id, timeout=60)
            report: Report = status.result(Report)
            print(f"result: {report}")

            history = await client.read_history(instance_id)
            scheduled = sum(event.TYPE == "ActivityScheduled" for event in history)
            timers = sum(event.TYPE == "TimerCreated" for event in history)
            print(f"history: {len(history)} events, {scheduled} activities scheduled, {timers} retry timers")
        await provider.close()


if __name__ == "__main__":
    asyncio.run(main())
