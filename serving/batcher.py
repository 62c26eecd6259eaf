"""Micro-batching of observations: many requests, one kernel call, group-committed writes.

Requests hand their observations to :meth:`MicroBatcher.submit` and wait. A
single task gathers what arrives for at most ``wait`` seconds or ``limit``
observations (a request is never split), closing early once turns of the
event loop bring no new request, then applies the batch on the event loop's
thread (the kernels and a log write without fsync: a few hundred
microseconds) and asks :class:`GroupSync` for durability. The fsync runs in
a thread of its own (RocksDB's SyncWAL, which lets the GIL go, unlike a
synced write), so the loop keeps reading, answering and applying meanwhile;
a batch's requests are answered once an fsync that started after its write
has finished. While an fsync is under
way the next batch keeps gathering (it would wait for the next fsync
anyway), so batches grow with the disk's latency instead of multiplying
fsyncs. Batches are applied one at a time, in arrival order, so observations
of one user are applied in the order they arrived. A reader may see a
batch's effect before its requests are answered; if its fsync fails, they
get the error and the model refuses writes until it is reopened.
On shutdown the pending batches are applied, synced and answered before
the task ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from velox.errors import DataError

log = logging.getLogger(__name__)

_QUIET_TURNS = 2
"""Event-loop turns without a new request after which a batch closes before its deadline.

Two, because a request whose bytes arrive in one turn reaches :meth:`MicroBatcher.submit`
in the next (its data callback runs, then its handler task). Turns, not a timer: a timer
shorter than a millisecond is rounded up to one by epoll, so the 50 µs lull this replaced
held every batch for a whole millisecond whenever the loop had nothing else to do (about
half of a single client's round trip).
"""


@dataclass
class _Pending:
    columns: tuple[list, list, list, list]
    future: asyncio.Future
    tag: Any = None


class Closed(Exception):
    """The batcher is shutting down and takes no new observations."""


class GroupSync:
    """Group commit: every caller waits for durability, one fsync at a time covers them all.

    ``sync`` (blocking: :meth:`~feature_store.durable.DurableModel.sync_log`)
    runs in a thread of its own and makes every write made before it started
    durable. Callers that arrive while one runs wait for the next, which then
    covers all of them: the number of fsyncs adapts to the disk's speed, not
    to how batches happen to close.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="velox-log-sync")
        self._waiters: list[asyncio.Future] = []
        self._running: asyncio.Future | None = None

    def wait(self) -> asyncio.Future:
        """A future resolved once every write made before this call is durable."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiters.append(future)
        if self._running is None:
            self._start(loop)
        return future

    @property
    def busy(self) -> bool:
        return self._running is not None

    async def running(self, timeout: float) -> None:
        """Return when the fsync under way (if any) ends, or after ``timeout`` seconds."""
        if self._running is not None:
            await asyncio.wait({self._running}, timeout=timeout)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        waiters, self._waiters = self._waiters, []
        self._running = loop.run_in_executor(self._thread, self._sync)
        self._running.add_done_callback(lambda done: self._finished(done, waiters, loop))

    def _finished(
        self, done: asyncio.Future, waiters: list[asyncio.Future], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._running = None
        failure = Closed("the log sync was cancelled") if done.cancelled() else done.exception()
        for waiter in waiters:
            if waiter.done():
                continue
            if failure is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(failure)
        if self._waiters:
            self._start(loop)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class MicroBatcher:
    """Gather observations from concurrent requests and apply them together.

    Requests append to a plain deque and wake the batching task only when it
    sleeps for lack of work. While a batch is open the task yields one loop
    turn at a time and counts arrivals, rather than waiting per arrival: a
    batch holds tens of requests under load (``velox_batch_observations`` says
    how many), and per-arrival timers and queue wake-ups were a visible share
    of each observation's CPU time in the profile.
    """

    def __init__(
        self,
        apply: Callable[[list, list, list, list, list], Any],
        *,
        gate: asyncio.Event | None = None,
        wait: float,
        limit: int,
        on_batch: Callable[[int], None] = lambda n: None,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self._apply = apply
        self._group = GroupSync(sync) if sync is not None else None
        self._syncing: set[asyncio.Future] = set()
        self._gate = gate
        self._wait, self._limit = wait, limit
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._arrivals = 0
        self._wakeup: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.waiting = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="velox-batcher")

    async def submit(
        self, users: list, items: list, ratings: list, ts: list, tag: Any = None
    ) -> Any:
        """Queue one request's observations; its slice of the batch result when durable.

        A ``tag`` reaches ``apply`` with the request's place in the batch
        (the serving tier tags requests sent with an idempotency key).
        """
        if self._closed or self._task is None or self._task.done():
            raise Closed("the server is shutting down")
        future = self._loop.create_future()
        self.waiting += len(users)
        self._arrivals += 1
        self._pending.append(_Pending((users, items, ratings, ts), future, tag))
        self._wake()
        return await future

    async def close(self) -> None:
        """Stop taking observations, apply and answer what is queued, stop the worker."""
        self._closed = True
        self._wake()
        try:
            if self._task is not None:
                await self._task
        finally:  # answered or failed, no fsync may outlive the store
            if self._syncing:
                await asyncio.wait(self._syncing)
            if self._group is not None:
                self._group.close()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _run(self) -> None:
        loop = self._loop
        while self._pending or not self._closed:
            if not self._pending:
                self._wakeup = loop.create_future()
                await self._wakeup
                continue
            deadline = loop.time() + self._wait
            quiet = 0
            while self.waiting < self._limit and not self._closed:
                if self._group is not None and self._group.busy:
                    # This batch would wait for the next fsync anyway: gather until it can start.
                    await self._group.running(deadline - loop.time())
                    break
                # Wait for more only while they keep coming: quiet turns end the batch early.
                seen = self._arrivals
                await asyncio.sleep(0)
                quiet = quiet + 1 if self._arrivals == seen else 0
                if quiet >= _QUIET_TURNS or loop.time() >= deadline:
                    break
            batch, size = self._take()
            if batch:
                await self._apply_batch(batch, size)

    def _take(self) -> tuple[list[_Pending], int]:
        """Whole requests from the front, up to the batch limit; cancelled ones are dropped."""
        batch, size = [], 0
        while self._pending and size < self._limit:
            pending = self._pending.popleft()
            if pending.future.cancelled():  # its handler is gone: nobody will be answered
                self.waiting -= len(pending.columns[0])
                continue
            batch.append(pending)
            size += len(pending.columns[0])
        return batch, size

    async def _apply_batch(self, batch: list[_Pending], size: int) -> None:
        # The gate is closed while a version switch or deletion has the model (in a thread).
        while self._gate is not None and not self._gate.is_set():
            await self._gate.wait()
        self._apply_now(batch, size)

    def _apply_now(self, batch: list[_Pending], size: int) -> None:
        columns = tuple([value for p in batch for value in p.columns[c]] for c in range(4))
        parts = _parts(batch)
        tags = [
            (p.tag, part.start, part.stop - part.start) for p, part in parts if p.tag is not None
        ]
        self.waiting -= size
        self._on_batch(size)
        try:
            result = self._apply(*columns, tags)
        except Exception as exc:  # every request of the batch gets the failure
            if isinstance(exc, DataError):  # a refusal that says why (a full disk): no traceback
                log.warning("a batch of %d observations was refused: %s", size, exc)
            else:
                log.exception("applying a batch of %d observations failed", size)
            _answer(parts, None, exc)
            return
        if self._group is None:
            _answer(parts, result, None)
            return
        durable = self._group.wait()  # answered once the log holds the batch durably
        self._syncing.add(durable)
        durable.add_done_callback(self._syncing.discard)
        durable.add_done_callback(lambda done: _answer(parts, result, done.exception()))


def _parts(batch: list[_Pending]) -> list[tuple[_Pending, slice]]:
    """Each request with the slice of the batch its observations occupy."""
    parts, start = [], 0
    for pending in batch:
        end = start + len(pending.columns[0])
        parts.append((pending, slice(start, end)))
        start = end
    return parts


def _answer(parts: list[tuple[_Pending, slice]], result: Any, failure: BaseException | None):
    """Each request of the batch gets its slice of ``result``, or the failure."""
    for pending, part in parts:
        if pending.future.done():
            continue
        if failure is None:
            pending.future.set_result((result, part))
        else:
            pending.future.set_exception(failure)


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
