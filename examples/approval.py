"""Human approval with a timeout: wait for an external event or a durable timer, whichever is first.

An expense request needs a manager's approval. The orchestration publishes a custom status
("waiting for approval"), then races ``ctx.wait_for_event("approved")`` against
``ctx.sleep(timeout)`` with ``ctx.any``. A person (here: the script) approves through
``client.raise_event``; if nobody does in time, the timer wins and the request expires. The loser
of the race is cancelled either way.

The wait holds no thread and no memory in a real deployment: the timer and the subscription are
recorded in the database, so the approval can come days later, after any number of restarts.

Two requests run side by side: one gets approved, one times out (after 1 second, to keep the demo
short). Run it with ``python examples/approval.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from _common import DEMO_OPTIONS, temp_database

from perdure import ActivityContext, Client, OrchestrationContext, Registry, Runtime
from perdure_sqlite import SqliteProvider

app = Registry()


@dataclass
class Expense:
    """An expense request; ``timeout_seconds`` is how long the manager has to approve it."""

    employee: str
    amount: int
    timeout_seconds: float


@dataclass
class Approval:
    """The data the manager sends with the ``approved`` event."""

    approver: str
    comment: str = ""


@app.activity
def pay_out(ctx: ActivityContext, expense: Expense) -> str:
    return f"paid {expense.amount} EUR to {expense.employee}"


@app.activity
def notify_expired(ctx: ActivityContext, expense: Expense) -> str:
    return f"told {expense.employee} the request expired"


@app.orchestration
async def expense_approval(ctx: OrchestrationContext, expense: Expense) -> str:
    # Custom status is a small JSON value clients can read and watch; it is committed together
    # with the rest of this turn, so once a client sees "waiting" the event wait below is open.
    ctx.set_custom_status({"stage": "waiting for approval", "amount": expense.amount})

    # `ctx.any` returns (index, value) of the first to finish, in history order, and cancels the
    # rest. `result_type` converts the event's JSON data to an Approval.
    index, value = await ctx.any(
        [
            ctx.wait_for_event("approved", result_type=Approval),
            ctx.sleep(expense.timeout_seconds),
        ]
    )
    if index == 0:
        approval: Approval = value
        ctx.set_custom_status({"stage": "approved", "by": approval.approver})
        receipt = await ctx.call_activity(pay_out, expense)
        return f"approved by {approval.approver} ({approval.comment}): {receipt}"

    ctx.set_custom_status({"stage": "expired"})
    note = await ctx.call_activity(notify_expired, expense)
    return f"expired after {expense.timeout_seconds:g} s: {note}"


async def approve_when_ready(client: Client, instance_id: str) -> None:
    """Approve the request once it waits for approval (what a web handler would do)."""
    # Events are positional: one raised while nothing waits for it is recorded but never
    # delivered. So wait until the orchestration says it is waiting (custom status version 1).
    status, version = await client.wait_for_status_change(instance_id, last_seen_version=0, timeout=30)
    print(f"[{instance_id}] status v{version}: {status}")
    await client.raise_event(instance_id, "approved", Approval("maria", "looks fine"))
    print(f"[{instance_id}] raised event 'approved'")
    status, version = await client.wait_for_status_change(instance_id, last_seen_version=version, timeout=30)
    print(f"[{instance_id}] status v{version}: {status}")


async def main() -> None:
    with temp_database() as path:
        provider = SqliteProvider(path)
        async with Runtime(provider, app, DEMO_OPTIONS) as runtime:
            client = runtime.client
            approved = await client.start_orchestration(
                expense_approval, Expense("ann", 120, timeout_seconds=600), instance_id="expense-approved"
            )
            expired = await client.start_orchestration(
                expense_approval, Expense("bob", 80, timeout_seconds=1.0), instance_id="expense-expired"
            )
            await approve_when_ready(client, approved)

            for instance_id in (approved, expired):
                final = await client.wait_for_orchestration(instance_id, timeout=60)
                print(f"[{instance_id}] {final.status}: {final.result()}")
                print(f"[{instance_id}] final custom status: {final.custom_status_value()}")

            # Too late: the instance has completed, so this event is dropped and changes nothing.
            await client.raise_event(expired, "approved", Approval("maria", "sorry, late"))
        await provider.close()


if __name__ == "__main__":
    asyncio.run(main())
