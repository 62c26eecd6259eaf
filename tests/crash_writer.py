"""The writer the crash test kills: commits batches in a loop and acknowledges them.

Run as ``python -m tests.crash_writer STORE RUN MODE``. Batch ``k`` of run
``RUN`` is generated from the seed ``(RUN, k)``, and every observation in it
carries the timestamp ``RUN * 1e6 + k``, so the test can regenerate any batch
and tell batches apart in the log. The line ``ack RUN k first last`` is
printed only once the batch is durable:

* ``synced``: after :meth:`DurableModel.observe` returned (a synced commit);
* ``group``: the serving path's group commit: one to four batches are
  logged with ``observe(sync=False)``, then one :meth:`DurableModel.sync_log`
  (RocksDB SyncWAL) makes them all durable, and only then are they acknowledged.
* ``checkpoint``: group commit, and each background checkpoint prints
  ``checkpoint`` after each chunk of 8 user states is written (without the
  WAL, not yet flushed; batches are committed between chunks) and lingers
  there a moment, so the test can kill it inside the checkpoint: between its
  chunks, or before, during or after the flush that must precede the watermark.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

from feature_store import durable as durable_module
from feature_store.durable import DurableModel
from feature_store.online import OnlineStore
from tests.factories import small_model
from velox.config import StoreConfig

USERS = [f"u{j}" for j in range(50)]
ITEMS = [f"i{j}" for j in range(20)] + ["new1", "new2", "new3"]


def batch(run: int, k: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """The observations of batch ``k`` of ``run``: 1 to 40 of them, users repeating."""
    rng = np.random.default_rng([run, k])
    size = int(rng.integers(1, 41))
    return (
        rng.choice(USERS, size=size).tolist(),
        rng.choice(ITEMS, size=size).tolist(),
        rng.integers(1, 6, size=size).astype(float),
        np.full(size, run * 1e6 + k),
    )


class AnnouncingStore(OnlineStore):
    """A store whose checkpoints say when their user states are written, then linger."""

    def put_states(
        self, family: str, keys: Sequence[str], *args: object, **options: object
    ) -> None:
        super().put_states(family, keys, *args, **options)
        if keys:
            sys.stdout.write("checkpoint\n")
            sys.stdout.flush()
            time.sleep(0.005)


def open_model(path: str, mode: str = "synced") -> DurableModel:
    """Small cache and a fast write-back, so kills land in checkpoints and evictions too.

    In ``checkpoint`` mode user states are copied and written 8 at a time, so
    batches are committed between the chunks of one checkpoint.
    """
    if mode == "checkpoint":
        durable_module.CHECKPOINT_CHUNK = 8
    config = StoreConfig(cache_users=16, checkpoint_interval=0.01)
    store = AnnouncingStore(path) if mode == "checkpoint" else OnlineStore(path)
    return DurableModel(small_model(), store, config)


def main(path: str, run: int, mode: str) -> None:
    durable = open_model(path, mode)
    print("ready", durable.recovered, flush=True)
    group = np.random.default_rng(run)
    k = 0
    while True:
        size = 1 if mode == "synced" else int(group.integers(1, 5))
        pending = []
        for _ in range(size):
            _, seqs = durable.observe(*batch(run, k), sync=mode == "synced")
            pending.append((k, seqs))
            k += 1
        if mode != "synced":
            durable.sync_log()
        for number, seqs in pending:
            # One write per line: print() writes each piece separately when unbuffered.
            sys.stdout.write(f"ack {run} {number} {seqs[0]} {seqs[-1]}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
