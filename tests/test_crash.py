"""Crash safety with real processes: SIGKILL a committing writer again and again.

The writer (``tests/crash_writer.py``) runs a durable model with a small cache
and a 10 ms background write-back, so kills land in commits, checkpoints,
evictions and recoveries alike. It commits with synced writes, or as the
serving path does, by group commit (unsynced writes, then one SyncWAL before
the acknowledgements), or by group commit with each kill aimed inside a
checkpoint (its user states written without the WAL, before, during or after
the flush that must precede the watermark). After every kill the next writer recovers the store
and carries on. At the end the log must hold every acknowledged batch whole,
at the sequence numbers it was acknowledged with, no batch in part, with
contiguous sequence numbers, and the recovered states must equal a replay of
the whole log from an empty state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from feature_store.codec import decode_log
from feature_store.online import OnlineStore
from tests.crash_writer import batch, open_model
from tests.factories import small_model

ROOT = Path(__file__).resolve().parent.parent


def _run_and_kill(
    path: Path, run: int, mode: str, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Start a writer, SIGKILL it at a random moment, return the batches it acknowledged.

    The moment is set by what the writer did (acknowledgements counted, a
    checkpoint announced), not by the clock, so a loaded machine kills as
    far into the stream as an idle one.
    """
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", str(path), str(run), mode],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    lines: list[str] = []
    enough, checkpoint = threading.Event(), threading.Event()
    target = int(rng.integers(15, 40))  # acknowledged batches before the kill: counted, not timed

    def read() -> None:
        acks = 0
        for line in writer.stdout:
            lines.append(line)
            if line.startswith("ack"):
                acks += 1
                if acks >= target:
                    enough.set()
            elif line == "checkpoint\n" and acks > 20:  # once batches flow
                checkpoint.set()

    reader = threading.Thread(target=read)
    reader.start()
    if run % 6 == 5:  # some die while starting or recovering
        time.sleep(rng.uniform(0.05, 0.5))
    elif mode == "checkpoint":  # inside a checkpoint, around the flush before its watermark
        assert checkpoint.wait(timeout=120), lines
        time.sleep(rng.uniform(0.0, 0.03))
    else:  # the others at a random moment once batches flow
        assert enough.wait(timeout=120), lines
        time.sleep(rng.uniform(0.0, 0.05))
    os.kill(writer.pid, signal.SIGKILL)
    reader.join()
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    # A line cut short by the kill was never a complete acknowledgement.
    acks = [line for line in lines if line.startswith("ack") and line.endswith("\n")]
    return [tuple(int(x) for x in line.split()[1:]) for line in acks]


@pytest.mark.parametrize(("mode", "kills"), [("synced", 24), ("group", 12), ("checkpoint", 8)])
def test_sigkill_never_loses_an_acknowledged_batch_or_leaves_half_of_one(tmp_path, mode, kills):
    path = tmp_path / "db"
    rng = np.random.default_rng(2026)
    acknowledged = [ack for run in range(kills) for ack in _run_and_kill(path, run, mode, rng)]
    assert len(acknowledged) > 10 * kills  # the kills landed mid-stream, not before it

    with OnlineStore(path) as store:
        logged = list(store.records_after(0))
    seqs = np.array([seq for seq, _ in logged])
    np.testing.assert_array_equal(seqs, np.arange(1, len(seqs) + 1))  # contiguous, from 1
    runs = decode_log([record for _, record in logged])
    users = [u for r in runs for u in r.users]
    items = [i for r in runs for i in r.items]
    ratings = np.concatenate([r.ratings for r in runs])
    stamps = np.concatenate([r.timestamps for r in runs])

    positions = defaultdict(list)  # batch identity -> positions in the log
    for position, stamp in enumerate(stamps):
        positions[divmod(int(stamp), 1_000_000)].append(position)
    for (run, k), where in positions.items():  # every batch in the log is whole and in one piece
        want_users, want_items, want_ratings, _ = batch(run, k)
        assert where == list(range(where[0], where[0] + len(want_users))), (run, k)
        assert [users[p] for p in where] == want_users and [items[p] for p in where] == want_items
        np.testing.assert_array_equal(ratings[where], want_ratings)
    for run, k, first, last in acknowledged:  # and every acknowledged one is there
        assert positions[(run, k)] == list(range(first - 1, last)), (run, k)

    reference, done = small_model(), 0
    for applied in runs:
        reference.users.mark(reference.replay(applied), seqs[done : done + len(applied)])
        done += len(applied)
    names = sorted(reference.users.keys)
    rows = reference.users.find(names)
    recovered = open_model(path)
    try:
        A, b, count, seq, _ = recovered.statistics(names)
        np.testing.assert_array_equal(A, reference.users.A[rows])
        np.testing.assert_array_equal(b, reference.users.b[rows])
        np.testing.assert_array_equal(count, reference.users.count[rows])
        np.testing.assert_array_equal(seq, reference.users.seq[rows])
        new = ["new1", "new2", "new3"]
        np.testing.assert_allclose(
            recovered.model.items.A[recovered.model.items.find(new)],
            reference.items.A[reference.items.find(new)],
            rtol=1e-12,
        )
        assert recovered.model.biases.mean == pytest.approx(reference.biases.mean, rel=1e-12)
    finally:
        recovered.close()
