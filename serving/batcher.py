"""Micro-batching of observations: many requests, one kernel call, one synced write.

Requests hand their observations to :meth:`MicroBatcher.submit` and wait. A
single task gathers what arrives for at most ``wait`` seconds or ``limit``
observations (a request is never split), closing early after a short lull,
then applies the batch (kernels and the synced log write) on the event
loop's thread and answers every request from the result. rocksdict holds the
GIL through a synced write, so a worker thread only added GIL hand-offs
(measured: fewer observations per second, a longer tail); so did an
unsynced write on the loop followed by ``flush_wal`` in a thread (0.34x
instead of 0.45x hello-world with ``benchmarks/serve.py``). One batch is
applied at a time, in arrival order, so observations of one user are applied
in the order they arrived.
On shutdown the pending batch is applied and answered before the task ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_LULL = 0.0003
"""Seconds without a new observation after which a batch closes before its deadline."""


@dataclass
class _Pending:
    columns: tuple[list, list, list, list]
    future: asyncio.Future


class Closed(Exception):
    """The batcher is shutting down and takes no new observations."""


class MicroBatcher:
    """Gather observations from concurrent requests and apply them together."""

    def __init__(
        self,
        apply: Callable[[list, list, list, list], Any],
        *,
        gate: asyncio.Event | None = None,
        wait: float,
        limit: int,
        on_batch: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._apply = apply
        self._gate = gate
        self._busy = asyncio.Event()
        self._busy.set()
        self._wait, self._limit = wait, limit
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.waiting = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="velox-batcher")

    async def submit(self, users: list, items: list, ratings: list, ts: list) -> Any:
        """Queue one request's observations; its slice of the batch result when durable."""
        if self._closed:
            raise Closed("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self.waiting += len(users)
        self._queue.put_nowait(_Pending((users, items, ratings, ts), future))
        return await future

    async def close(self) -> None:
        """Stop taking observations, apply and answer what is queued, stop the worker."""
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch, size = [first], len(first.columns[0])
            deadline = loop.time() + self._wait
            while size < self._limit:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    # Wait for more only while they keep coming: a lull ends the batch early.
                    left = min(deadline - loop.time(), _LULL)
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                size += len(item.columns[0])
            await self._apply_batch(batch, size)

    async def idle(self) -> None:
        """Return once no batch is being applied (with the gate closed, none will start)."""
        await self._busy.wait()

    async def _apply_batch(self, batch: list[_Pending], size: int) -> None:
        if self._gate is not None:  # held while a version switch or deletion has the model
            await self._gate.wait()
        self._busy.clear()
        try:
            await self._apply_now(batch, size)
        finally:
            self._busy.set()

    async def _apply_now(self, batch: list[_Pending], size: int) -> None:
        columns = tuple([value for p in batch for value in p.columns[c]] for c in range(4))
        self.waiting -= size
        self._on_batch(size)
        try:
            result = self._apply(*columns)
        except Exception as exc:  # every request of the batch gets the failure
            log.exception("applying a batch of %d observations failed", size)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            n = len(pending.columns[0])
            if not pending.future.done():
                pending.future.set_result((result, slice(start, start + n)))
            start += n


class ReadBatcher:
    """Predict requests that arrive in the same event-loop turn share one model call.

    A turn of the loop often starts several handlers (one per connection that
    had data); each queues its ``(user, items)`` and the first schedules one
    flush at the end of the turn, so batching adds no waiting. The model's
    per-call overhead (NumPy dispatch, the lock, lookups) is then paid once
    per turn instead of once per request.
    """

    def __init__(self, compute: Callable[[list, list, float], list]) -> None:
        self._compute = compute
        self._pending: list[tuple[str, list, float, asyncio.Future]] = []

    def submit(self, user: str, items: list, started: float) -> asyncio.Future:
        """Queue one request (``started``: its arrival on the monotonic clock)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((user, items, started, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            results = self._compute(
                [user for user, _, _, _ in batch],
                [items for _, items, _, _ in batch],
                min(started for _, _, started, _ in batch),
            )
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
