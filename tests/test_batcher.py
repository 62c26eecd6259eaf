"""The observe micro-batcher and its group commit, with a real fsync stand-in in a thread."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batcher import Closed, MicroBatcher


class Log:
    """Applies batches in memory and "syncs" slowly in a thread, recording what was durable."""

    def __init__(self, sync_seconds: float = 0.01, fail_sync: bool = False) -> None:
        self.applied: list[tuple] = []  # every observation, in applied order
        self.batches = 0
        self.durable_batches = 0  # batches written before the start of the last finished sync
        self.syncs = 0
        self.sync_seconds, self.fail_sync = sync_seconds, fail_sync
        self._lock = threading.Lock()

    def apply(self, users, items, ratings, ts, tags):
        with self._lock:
            self.applied += list(zip(users, items, ratings, ts, strict=True))
            self.batches += 1
            return self.batches

    def sync(self) -> None:
        with self._lock:
            covered = self.batches
        time.sleep(self.sync_seconds)  # the disk working, GIL released
        if self.fail_sync:
            raise OSError("Input/output error")
        with self._lock:
            self.durable_batches = max(self.durable_batches, covered)
            self.syncs += 1


class WatchedGate(asyncio.Event):
    """A batch gate that tells when the batcher waits at it (instead of sleeping and hoping)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting = asyncio.Event()

    async def wait(self) -> bool:
        self._waiting.set()
        return await super().wait()

    async def reached(self) -> None:
        """Return once the batcher waits at the gate (fail if it never comes)."""
        await asyncio.wait_for(self._waiting.wait(), timeout=30)
        self._waiting.clear()


def _batcher(log: Log, **options) -> MicroBatcher:
    settings = {"wait": 0.002, "limit": 256, "sync": log.sync, **options}
    batcher = MicroBatcher(log.apply, **settings)
    batcher.start()
    return batcher


async def _observe(batcher: MicroBatcher, log: Log, user: str, n: int):
    batch, part = await batcher.submit([user], [f"i{n}"], [float(n)], [0.0])
    assert log.durable_batches >= batch, "answered before its batch was durable"
    return batch, part


async def test_requests_are_answered_only_after_a_sync_that_covers_their_batch():
    log = Log(sync_seconds=0.005)
    batcher = _batcher(log)
    # All 300 are queued in one loop turn, before the batcher runs: two batches (limit 256).
    answers = await asyncio.gather(*(_observe(batcher, log, f"u{n % 7}", n) for n in range(300)))
    await batcher.close()
    assert len(answers) == 300 and len(log.applied) == 300
    assert log.batches == 2 and log.syncs <= 2
    assert {part.stop - part.start for _, part in answers} == {1}


async def test_one_users_observations_are_applied_in_arrival_order():
    log = Log()
    batcher = _batcher(log)
    await asyncio.gather(*(_observe(batcher, log, "same", n) for n in range(100)))
    await batcher.close()
    assert [rating for _, _, rating, _ in log.applied] == [float(n) for n in range(100)]


async def test_a_slow_disk_grows_batches_instead_of_multiplying_fsyncs():
    log = Log(sync_seconds=0.02)
    batcher = _batcher(log, wait=10.0)  # a batch closes on a lull, or when the fsync ends

    async def steady(n):  # requests keep arriving while fsyncs are under way
        await asyncio.sleep(n * 0.0005)
        return await _observe(batcher, log, f"u{n}", n)

    await asyncio.gather(*(steady(n) for n in range(400)))
    await batcher.close()
    # Each batch after the first gathers while the previous fsync runs: one fsync per batch,
    # where a batcher that closed batches on lulls alone would apply one per request.
    assert log.batches <= log.syncs + 1 and log.batches < 400


async def test_a_failed_sync_fails_every_request_it_covered():
    log = Log(fail_sync=True)
    batcher = _batcher(log)
    results = await asyncio.gather(
        *(batcher.submit([f"u{n}"], ["i"], [1.0], [0.0]) for n in range(20)),
        return_exceptions=True,
    )
    await batcher.close()
    assert all(isinstance(r, OSError) for r in results)


async def test_closing_answers_everything_queued_and_refuses_new_work():
    gate = WatchedGate()
    log = Log(sync_seconds=0.01)
    batcher = _batcher(log, gate=gate)
    pending = [
        asyncio.ensure_future(batcher.submit([f"u{n}"], ["i"], [1.0], [0.0])) for n in range(50)
    ]
    await gate.reached()  # queued, not yet applied
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)  # close() has begun
    with pytest.raises(Closed):  # (a batcher that took it would never answer: time out)
        await asyncio.wait_for(batcher.submit(["late"], ["i"], [1.0], [0.0]), timeout=30)
    assert log.batches == 0
    gate.set()
    await closing
    assert all(p.done() and not p.exception() for p in pending)
    assert len(log.applied) == 50 and log.durable_batches == log.batches


async def test_without_a_sync_the_apply_itself_is_the_durability_point():
    log = Log()
    batcher = _batcher(log, sync=None)
    batch, part = await batcher.submit(["u", "u"], ["a", "b"], [1.0, 2.0], [0.0, 0.0])
    await batcher.close()
    assert (batch, part) == (1, slice(0, 2)) and log.syncs == 0


async def test_a_closed_gate_holds_batches_until_it_stays_open():
    gate = WatchedGate()
    log = Log()
    batcher = _batcher(log, gate=gate)
    request = asyncio.ensure_future(batcher.submit(["u"], ["i"], [1.0], [0.0]))
    await gate.reached()
    assert log.batches == 0
    gate.set()
    gate.clear()  # opened and closed again (overlapping switches) before the batcher ran
    await gate.reached()
    assert log.batches == 0
    gate.set()
    await request
    await batcher.close()
    assert log.batches == 1


async def test_a_request_cancelled_before_its_batch_is_not_applied():
    gate = WatchedGate()
    log = Log()
    batcher = _batcher(log, gate=gate)
    kept = asyncio.ensure_future(batcher.submit(["kept"], ["i"], [1.0], [0.0]))
    await gate.reached()  # the first batch waits at the gate with "kept"
    dropped = asyncio.ensure_future(batcher.submit(["dropped"], ["i"], [1.0], [0.0]))
    await asyncio.sleep(0)  # queued for the next batch
    dropped.cancel()  # e.g. its client went away; a retry may come with the same key
    gate.set()
    await kept
    await batcher.close()
    assert [user for user, *_ in log.applied] == ["kept"] and batcher.waiting == 0
