"""Saga: a multi-step transaction that undoes its completed steps when a later step fails.

Booking a trip reserves a flight, a hotel and a car, each with a different service; no database
transaction spans them. The orchestration remembers a compensation for every step that succeeded
and, when a step fails, runs those compensations in reverse order. Because every step is
recorded, a crash halfway through the compensations resumes them instead of forgetting them.

Two trips are booked: one where everything works, and one where no car is available.
Run it with ``python examples/saga.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from _common import DEMO_OPTIONS, temp_database

from perdure import ActivityContext, ActivityFailed, OrchestrationContext, Registry, RetryPolicy, Runtime
from perdure_sqlite import SqliteProvider

app = Registry()


@dataclass
class Trip:
    """What to book."""

    traveller: str
    city: str


@dataclass
class Booking:
    """The outcome: what was reserved, or what was undone and why."""

    status: str
    reservations: list[str]
    compensated: list[str]
    error: str | None = None


class NoAvailability(Exception):
    """Raised by a reservation service that cannot serve the request."""


# -- the steps and their compensations (each one an activity) -----------------------------------


@app.activity
def reserve_flight(ctx: ActivityContext, trip: Trip) -> str:
    print(f"  reserve flight to {trip.city}")
    return f"flight:{trip.city}"


@app.activity
def reserve_hotel(ctx: ActivityContext, trip: Trip) -> str:
    print(f"  reserve hotel in {trip.city}")
    return f"hotel:{trip.city}"


@app.activity
def reserve_car(ctx: ActivityContext, trip: Trip) -> str:
    if trip.city == "Venice":
        print("  reserve car: none available")
        raise NoAvailability(f"no cars in {trip.city}")
    print(f"  reserve car in {trip.city}")
    return f"car:{trip.city}"


@app.activity
def cancel_reservation(ctx: ActivityContext, reservation: str) -> str:
    # Compensations must be idempotent: an activity can run more than once (at-least-once).
    print(f"  cancel {reservation}")
    return reservation


# -- the saga ---------------------------------------------------------------------------------

# Compensations have to succeed eventually, so they are retried generously.
COMPENSATION_RETRY = RetryPolicy(max_attempts=10, backoff="exponential", delay=0.5, max_delay=30)


@app.orchestration
async def book_trip(ctx: OrchestrationContext, trip: Trip) -> Booking:
    reservations: list[str] = []
    try:
        for step in (reserve_flight, reserve_hotel, reserve_car):
            reservations.append(await ctx.call_activity(step, trip))
    except ActivityFailed as failure:
        # The original exception cannot cross the process boundary; its type name and message
        # travel with ActivityFailed (failure.type_name == "NoAvailability").
        ctx.logger.info("booking failed, compensating: %s", failure.message)
        compensated = []
        for reservation in reversed(reservations):  # undo in reverse order
            undone = await ctx.call_activity(cancel_reservation, reservation, retry=COMPENSATION_RETRY)
            compensated.append(undone)
        return Booking("cancelled", [], compensated, f"{failure.type_name}: {failure.message}")
    return Booking("booked", reservations, [])


async def main() -> None:
    with temp_database() as path:
        provider = SqliteProvider(path)
        async with Runtime(provider, app, DEMO_OPTIONS) as runtime:
            client = runtime.client
            for trip in (Trip("ann", "Lisbon"), Trip("bob", "Venice")):
                print(f"booking a trip to {trip.city} for {trip.traveller}:")
                instance_id = await client.start_orchestration(book_trip, trip)
                status = await client.wait_for_orchestration(instance_id, timeout=60)
                booking: Booking = status.result(Booking)
                print(f"outcome: {booking.status}")
                if booking.reservations:
                    print(f"  reservations: {booking.reservations}")
                if booking.error:
                    print(f"  because: {booking.error}")
                    print(f"  compensated in reverse order: {booking.compensated}")
        await provider.close()


if __name__ == "__main__":
    asyncio.run(main())
