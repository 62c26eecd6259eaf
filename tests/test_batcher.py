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
    answers = await asyncio.gather(*(_observe(batcher, log, f"u{n % 7}", n) for n in range(300)))
    await batcher.close()
    assert len(answers) == 300 and len(log.applied) == 300
    assert log.syncs < log.batches + 1


async def test_one_users_observations_are_applied_in_arrival_order():
    log = Log()
    batcher = _batcher(log)
    await asyncio.gather(*(_observe(batcher, log, "same", n) for n in range(100)))
    await batcher.close()
    assert [rating for _, _, rating, _ in log.applied] == [float(n) for n in range(100)]


async def test_a_slow_disk_grows_batches_instead_of_multiplying_fsyncs():
    log = Log(sync_seconds=0.02)
    batcher = _batcher(log, wait=0.05)

    async def steady(n):  # requests keep arriving while fsyncs are under way
        await asyncio.sleep(n * 0.0005)
        return await _observe(batcher, log, f"u{n}", n)

    started = time.monotonic()
    await asyncio.gather(*(steady(n) for n in range(400)))
    elapsed = time.monotonic() - started
    await batcher.close()
    assert log.syncs <= elapsed / 0.02 + 2  # back to back at most, not one per request
    assert log.batches <= log.syncs + 2  # a batch gathers while the previous fsync runs


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
    log = Log(sync_seconds=0.01)
    batcher = _batcher(log, wait=1.0)
    pending = [
        asyncio.ensure_future(batcher.submit([f"u{n}"], ["i"], [1.0], [0.0])) for n in range(50)
    ]
    await asyncio.sleep(0)  # queued, not yet applied
    await batcher.close()
    assert all(p.done() and not p.exception() for p in pending)
    assert len(log.applied) == 50 and log.durable_batches == log.batches
    with pytest.raises(Closed):
        await batcher.submit(["late"], ["i"], [1.0], [0.0])


async def test_without_a_sync_the_apply_itself_is_the_durability_point():
    log = Log()
    batcher = _batcher(log, sync=None)
    batch, part = await batcher.submit(["u", "u"], ["a", "b"], [1.0, 2.0], [0.0, 0.0])
    await batcher.close()
    assert (batch, part) == (1, slice(0, 2)) and log.syncs == 0


async def test_a_closed_gate_holds_batches_until_it_stays_open():
    gate = asyncio.Event()
    log = Log()
    batcher = _batcher(log, gate=gate)
    request = asyncio.ensure_future(batcher.submit(["u"], ["i"], [1.0], [0.0]))
    await asyncio.sleep(0.01)
    assert log.batches == 0
    gate.set()
    gate.clear()  # opened and closed again (overlapping switches) before the batcher ran
    await asyncio.sleep(0.01)
    assert log.batches == 0
    gate.set()
    await request
    await batcher.close()
    assert log.batches == 1


async def test_a_request_cancelled_before_its_batch_is_not_applied():
    gate = asyncio.Event()
    log = Log()
    batcher = _batcher(log, gate=gate)
    kept = asyncio.ensure_future(batcher.submit(["kept"], ["i"], [1.0], [0.0]))
    await asyncio.sleep(0.01)  # the first batch waits at the gate with "kept"
    dropped = asyncio.ensure_future(batcher.submit(["dropped"], ["i"], [1.0], [0.0]))
    await asyncio.sleep(0)
    dropped.cancel()  # e.g. its client went away; a retry may come with the same key
    gate.set()
    await kept
    await batcher.close()
    assert [user for user, *_ in log.applied] == ["kept"] and batcher.waiting == 0
