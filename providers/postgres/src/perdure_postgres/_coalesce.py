"""Coalescing of concurrent independent calls into few statements (group commit for clients).

Many tasks of one process calling ``enqueue_orchestrator_messages`` or ``get_instance`` at once
(a web server starting workflows, a client waiting on many instances) would each pay a round trip
and, for writes, a durable commit. A :class:`Coalescer` sends a call at once while fewer than
``max_in_flight`` statements of its kind are running; calls that arrive meanwhile queue and go
together in the next statement. A lone caller never waits for anybody (no linger); under load
the batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from perdure.provider import ProviderError

K = TypeVar("K")
R = TypeVar("R")


class Coalescer(Generic[K, R]):
    """Runs ``run_batch(items) -> results`` (one result per item, in order) for concurrent callers.

    If a batch of several calls fails with a permanent :class:`ProviderError`, each call is
    run again on its own, so one bad call never fails the others; any other failure is every
    caller's failure. A caller cancelled before its batch is sent is left out of it.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[K]], Awaitable[Sequence[R]]],
        *,
        max_in_flight: int = 2,
        max_batch: int = 500,
    ) -> None:
        self._run_batch = run_batch
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: deque[tuple[K, asyncio.Future[R]]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Statements sent (for tests and diagnostics).
        self.batches = 0

    async def submit(self, item: K) -> R:
        """Run ``item`` (possibly with others) and return its result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            batch: list[tuple[K, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self._max_batch:
                entry = self._queue.popleft()
                if not entry[1].cancelled():
                    batch.append(entry)
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[K, asyncio.Future[R]]]) -> None:
        try:
            self.batches += 1
            try:
                results = await self._run_batch([item for item, _ in batch])
            except ProviderError as exc:
                if exc.retryable or len(batch) == 1:
                    _fail(batch, exc)
                    return
                for entry in batch:
                    await self._run_alone(entry)
                return
            except BaseException as exc:
                _fail(batch, exc)
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _run_alone(self, entry: tuple[K, asyncio.Future[R]]) -> None:
        item, future = entry
        try:
            [result] = await self._run_batch([item])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


def _fail(batch: list[tuple[K, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


__all__ = ["Coalescer"]
