"""A disk that fails under the durable model: it says so, refuses writes, loses nothing.

A real full filesystem (a small tmpfs, where one can be mounted) fails the
log write first: the model refuses every write from then on until the store
is reopened (by itself once space is back: ``tests/test_disk_heals.py``).
A disk that fails only the checkpoint write-back, the one place a failing
disk could grow memory without bound, cannot be made for real, so there the
fault is injected into the store's checkpoint write; everything else is
real: RocksDB, the log, eviction, recovery.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from feature_store.durable import CACHE_LIMIT, REFUSE_AFTER, DurableModel, Unavailable
from feature_store.online import OnlineStore
from tests.factories import small_model
from tests.test_durable import _full_replay
from velox.config import StoreConfig
from velox.errors import DataError

CACHE = 8


def _batch(k: int) -> tuple[list[str], list[str], list[float], list[float]]:
    """Batch ``k``: four users never seen before, so every batch grows the cache."""
    users = [f"user{k}-{j}" for j in range(4)]
    items = [f"i{(k + j) % 20}" for j in range(4)]
    return users, items, [1.0 + k % 5] * 4, [float(k)] * 4


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _open(path, interval: float = 0.0) -> DurableModel:
    config = StoreConfig(cache_users=CACHE, checkpoint_interval=interval)
    return DurableModel(small_model(), OnlineStore(path), config)


def test_a_failing_disk_is_reported_refuses_writes_and_loses_nothing_acknowledged(
    tmp_path, monkeypatch
):
    path = tmp_path / "db"
    durable = _open(path)
    acknowledged: dict[int, tuple] = {}  # sequence number -> (user, item, rating)

    def observe(k: int) -> None:
        users, items, ratings, stamps = _batch(k)
        _, seqs = durable.observe(users, items, ratings, stamps)
        observations = zip(users, items, ratings, strict=True)
        acknowledged.update(zip(seqs.tolist(), observations, strict=True))

    for k in range(4):
        observe(k)
    assert durable.problem is None and durable.failures == {"write_back": 0, "eviction": 0}

    monkeypatch.setattr(durable.store, "write_checkpoint", _full_disk)
    k = 4
    with pytest.raises(Unavailable) as refused:
        while k < 100:  # the cache can hold at most CACHE_LIMIT * CACHE users: refused by then
            observe(k)
            k += 1
    assert issubclass(Unavailable, DataError)
    message = str(refused.value)
    assert "No space left on device" in message and "fix the disk" in message
    assert durable.failures["write_back"] >= REFUSE_AFTER and durable.failures["eviction"] > 0
    problem = durable.problem
    assert problem is not None and "No space left on device" in problem
    assert "in a row since" in problem and problem.count(". ") == 0  # one sentence

    held, logged, mean = len(durable.model.users), durable.store.last_seq, durable.model.biases.mean
    assert held <= CACHE_LIMIT * CACHE + 4  # bounded: at most one batch past the limit
    for attempt in range(k, k + 20):  # refused again and again: nothing applied, nothing grows
        with pytest.raises(Unavailable):
            observe(attempt)
    assert len(durable.model.users) == held and durable.store.last_seq == logged
    assert durable.model.biases.mean == mean
    assert len(acknowledged) == logged  # every logged batch was acknowledged, none refused

    monkeypatch.undo()  # the disk works again: the next write-back lifts the refusal itself
    observe(1000)
    assert durable.problem is None and len(durable.model.users) <= CACHE
    failures = durable.failures
    observe(1001)
    assert durable.failures == failures  # counted since opening; nothing new

    users = sorted({user for user, *_ in acknowledged.values()})
    durable.store.close()  # a crash: what was not checkpointed comes back from the log
    with OnlineStore(path) as store:
        logged_now = {seq: (o.user, o.item, o.rating) for seq, o in store.log_after(0)}
    assert logged_now == acknowledged  # every acknowledged observation, at its sequence number
    reference, _ = _full_replay(path)
    recovered = _open(path)
    A, b, count, seq, _ = recovered.statistics(users)
    counts = Counter(user for user, *_ in acknowledged.values())
    np.testing.assert_array_equal(count, [counts[u] for u in users])
    rows = reference.users.find(users)
    np.testing.assert_array_equal(A, reference.users.A[rows])
    np.testing.assert_array_equal(b, reference.users.b[rows])
    last = {user: number for number, (user, *_) in sorted(acknowledged.items())}
    np.testing.assert_array_equal(seq, [last[u] for u in users])
    recovered.close()


def test_the_background_write_back_reports_its_failures_and_stops_writes(tmp_path, monkeypatch):
    durable = _open(tmp_path / "db", interval=0.001)
    failed = threading.Event()
    calls = 0

    def full_disk(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls >= REFUSE_AFTER:
            failed.set()
        _full_disk()

    durable.observe(*_batch(0))  # one dirty batch, far below the cache's capacity
    monkeypatch.setattr(durable.store, "write_checkpoint", full_disk)
    durable.observe(*_batch(1))
    assert failed.wait(timeout=60)  # the writer retried REFUSE_AFTER times on its own
    with pytest.raises(Unavailable, match="write-back keeps failing"):
        durable.observe(*_batch(2))
    assert "write-back has failed" in durable.problem
    assert durable.failures["write_back"] >= REFUSE_AFTER
    monkeypatch.undo()
    durable.observe(*_batch(2))
    assert durable.problem is None
    durable.close()


def test_a_full_filesystem_refuses_writes_and_loses_nothing_acknowledged(tmp_path):
    """A real full disk: the log write fails first, then every write is refused until a reopen."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("no small filesystem can be mounted here (unshare -rm, mount -t tmpfs)")
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, "-m", "tests.full_disk_scenario", str(mount)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    first, *again = result["refusals"]
    assert "were not stored" in first and "No space left on device" in first
    assert all("refuses writes" in refusal for refusal in again) and len(again) == 2
    assert "No space left on device" in result["problem"] and "fix the disk" in result["problem"]
    acknowledged = result["acknowledged"]
    assert acknowledged and result["logged"] == acknowledged  # each at its sequence number
    per_user = Counter(acknowledged.values())
    assert result["counts"] == {user: per_user[user] for user in result["counts"]}
