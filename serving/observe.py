"""Observations from requests to the durable model: micro-batches, group commit, idempotency.

:class:`Observations` runs the :class:`~serving.batcher.MicroBatcher`: each
request's observations wait for a batch, the batch is applied and logged on
the event loop without an fsync, and the requests are answered once a group
fsync covers it (see :mod:`serving.batcher`). A batch waits at the
:class:`~serving.state.Gate` while a switch or deletion holds the model, and
one that meets a model replaced meanwhile is applied by the new one.

A request sent with an ``Idempotency-Key`` is applied once however often it
is retried (:meth:`Observations.once`).
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from feature_store.codec import decode_log
from feature_store.durable import Replaced
from feature_store.receipts import Receipt
from serving.batcher import Closed, MicroBatcher
from serving.schemas import Observed, RequestError
from serving.state import Serving

Columns = tuple[list[str], list[str], list[float], list[float]]


class Observations:
    """The observe path of one application: its batcher and the keyed requests under way."""

    def __init__(self, state: Serving) -> None:
        self._state = state
        self._running: dict[str, tuple[bytes, asyncio.Future]] = {}
        """Idempotency key -> (body digest, future answer) of keyed requests not yet answered."""
        limits = state.limits
        self.batcher = MicroBatcher(
            self._apply,
            gate=state.gate.event,
            wait=limits.batch_wait_ms / 1000,
            limit=limits.batch_max,
            on_batch=lambda n: state.metrics.batch_size.observe(n),
            sync=self._sync,
        )

    def _sync(self) -> None:
        """The group commit's fsync (in its thread), timed: a slow disk shows in /metrics."""
        with self._state.metrics.log_sync.time():
            self._state.durable.sync_log()

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        """Apply, sync and answer what is queued; take nothing more."""
        await self.batcher.close()

    async def submit(self, columns: Columns) -> Observed:
        """Apply a request's observations once they are durable; its answer."""
        (seqs, predictions, cold), part = await self.batcher.submit(*columns)
        return _observed(seqs[part], predictions[part], cold[part])

    async def once(self, key: str, raw: bytes, columns: Columns) -> tuple[Observed, bool]:
        """A request sent with an idempotency key: its answer, and whether it is a replay.

        The key's receipt (the body's digest and the log records it became) is
        written with those records, so a retry after an answer that got lost or
        a crash gets the first answer again instead of applying the
        observations twice. A retry while the first is still in its batch
        waits for it; one whose records are logged but not yet fsynced (the
        first attempt failed mid-way) gets a 503 until they are on disk (after
        a failed fsync: until the store is reopened). The same key with
        another body is a 422; a replay of a deleted user's records is a 410.
        """
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        running = self._running.get(key)
        if running is not None:
            if running[0] != digest:
                raise _key_reused(key)
            return await asyncio.shield(running[1]), True
        durable = self._state.durable
        receipt = durable.receipt(key)
        if receipt is not None:
            if receipt.digest != digest:
                raise _key_reused(key)
            if receipt.first + receipt.count - 1 > durable.synced_seq:
                raise RequestError(
                    503,
                    "unavailable",
                    "this request is logged but not yet known to be on disk; retry",
                )
            return self._from_log(receipt), True
        answer = asyncio.get_running_loop().create_future()
        self._running[key] = (digest, answer)
        try:
            (seqs, predictions, cold), part = await self.batcher.submit(*columns, tag=(key, digest))
            answer.set_result(_observed(seqs[part], predictions[part], cold[part]))
        except BaseException as exc:  # retries waiting on it fail too (and may retry again)
            failure = exc if isinstance(exc, Exception) else Closed("the first try was cancelled")
            answer.set_exception(failure)
            answer.exception()  # retrieved, whether or not a retry was waiting
            raise
        finally:
            del self._running[key]
        return answer.result(), False

    def _apply(self, users: list, items: list, ratings: list, ts: list, tags: list):
        """Apply and log one batch without fsync; its columns as lists (answers slice them)."""
        receipts = [Receipt(key, digest, first, n) for (key, digest), first, n in tags]
        state = self._state
        durable = state.durable
        new_before = durable.new_users
        try:
            applied, seqs = durable.observe(
                users, items, ratings, ts, sync=False, receipts=receipts
            )
        except Replaced:  # a version switch finished while this batch waited: use the new one
            durable = state.durable
            new_before = durable.new_users
            applied, seqs = durable.observe(
                users, items, ratings, ts, sync=False, receipts=receipts
            )
        errors = applied.predictions - applied.ratings
        state.metrics.prequential(applied.version, float(np.sum(errors**2)), len(errors))
        if state.retrainer is not None:
            state.retrainer.observed(
                applied.version,
                applied.predictions,
                applied.ratings,
                applied.timestamps,
                durable.new_users - new_before,
            )
        return seqs.tolist(), applied.predictions.tolist(), applied.cold.tolist()

    def _from_log(self, receipt: Receipt) -> Observed:
        """The first answer to an idempotent request, rebuilt from its log records."""
        durable = self._state.durable
        records = durable.records(receipt.first, receipt.count)
        if records is None and receipt.first < durable.log_start:
            raise RequestError(
                410,
                "gone",
                "this request was applied, but retention has trimmed its log records since, so "
                "its first answer cannot be rebuilt; do not send it again",
            )
        if records is None:
            raise RequestError(
                410, "gone", "the observations of this request were deleted with their user"
            )
        runs = decode_log(records)
        return _observed(
            list(range(receipt.first, receipt.first + receipt.count)),
            [p for run in runs for p in run.predictions.tolist()],
            [c for run in runs for c in run.cold.tolist()],
        )


def _observed(seqs: list, predictions: list, cold: list) -> Observed:
    return Observed(len(seqs), seqs, predictions, cold)


def _key_reused(key: str) -> RequestError:
    return RequestError(
        422, "idempotency_key_reused", f"Idempotency-Key {key!r} came with another body"
    )
