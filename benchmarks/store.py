"""Durable-write throughput and crash recovery of the online store, against same-run baselines.

* **group commit**: observations per second when micro-batches of 1, 16 and
  256 are each committed with one synced ``WriteBatch``
  (:meth:`OnlineStore.commit`), against the baseline of one synced write per
  observation (the same commit call, one observation at a time);
* **recovery**: seconds to reopen a store whose process died with
  ``--observations`` logged observations after its last checkpoint (the whole
  log replayed), against the time the live model took to apply the same
  observations (``observe_many`` alone, no commits) in the same run.

Usage: ``python -m benchmarks.store [--observations 1000000] [--rank 32] [--repeats 3]
[--check]``. Prints Markdown tables; ``--check`` exits 1 when group commit at
batch 256 is under 20x the per-observation rate (issue 3).

``--checkpoints GROUPS [--users 20000]`` measures only the latency of group
commits (four unsynced batches of 256, one SyncWAL: the HTTP tier's commit)
without background checkpoints and with one every 0.5 s, in the same run
(issue 12: a checkpoint's user states no longer go through the WAL that a
commit's fsync writes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import median_seconds
from feature_store.durable import DurableModel
from feature_store.online import OnlineStore
from velox.config import ModelConfig, StoreConfig
from velox.features import MatrixFactorization
from velox.model import Applied, OnlineModel

BATCHES = (1, 16, 256)
TARGET = 20.0
WARM_UP = 10


def synthetic_model(rank: int, items: int = 2_000) -> OnlineModel:
    """A model version of random item features (what the store benchmarks serve)."""
    rng = np.random.default_rng(0)
    ids = [f"item{j}" for j in range(items)]
    features = MatrixFactorization(ids, rng.normal(0, 0.3, (items, rank)), version="v1")
    return OnlineModel(
        features,
        global_mean=3.5,
        item_bias=rng.normal(0, 0.3, items),
        train_count=100_000,
        config=ModelConfig(),
    )


def synthetic_stream(
    n: int, users: int, items: int, seed: int
) -> tuple[list[str], list[str], np.ndarray]:
    """``n`` observations of uniformly drawn users and items, ratings 1 to 5."""
    rng = np.random.default_rng(seed)
    return (
        [f"user{u}" for u in rng.integers(0, users, n)],
        [f"item{i}" for i in rng.integers(0, items, n)],
        rng.integers(1, 6, n).astype(float),
    )


def _applied_batches(rank: int, size: int, count: int) -> list[Applied]:
    model = synthetic_model(rank)
    users, items, ratings = synthetic_stream(size * count, users=5_000, items=2_000, seed=size)
    return [
        model.observe_many(users[s : s + size], items[s : s + size], ratings[s : s + size])
        for s in range(0, size * count, size)
    ]


def group_commit(rank: int, repeats: int, folder: Path) -> list[dict[str, float]]:
    """Observations/s of synced commits per batch size, and the per-observation baseline."""
    singles = _applied_batches(rank, 1, 200)
    with OnlineStore(folder / "baseline") as store:
        base = len(singles) / median_seconds(lambda: [store.commit(a) for a in singles], repeats)
    rows = []
    for size in BATCHES:
        batches = _applied_batches(rank, size, max(20, 4096 // size))
        n = size * len(batches)
        with OnlineStore(folder / f"batch{size}") as store:
            rate = n / median_seconds(lambda s=store, b=batches: [s.commit(a) for a in b], repeats)
        rows.append({"batch": size, "rate": rate, "baseline": base, "ratio": rate / base})
    return rows


def recovery(n: int, rank: int, folder: Path) -> dict[str, float]:
    """Reopen time after a crash with ``n`` observations logged since the last checkpoint."""
    users, items, ratings = synthetic_stream(n, users=50_000, items=2_000, seed=7)
    config = StoreConfig(cache_users=100_000, checkpoint_interval=0)
    durable = DurableModel(synthetic_model(rank), OnlineStore(folder / "recovery"), config)
    live = 0.0
    for start in range(0, n, 1024):
        part = slice(start, start + 1024)
        began = time.perf_counter()
        applied = durable.model.observe_many(users[part], items[part], ratings[part])
        live += time.perf_counter() - began
        durable.store.commit(applied)
    durable.store.close()  # the process dies: no checkpoint is written
    began = time.perf_counter()
    reopened = DurableModel(synthetic_model(rank), OnlineStore(folder / "recovery"), config)
    seconds = time.perf_counter() - began
    assert reopened.recovered == n, reopened.recovered
    reopened.close()
    return {"observations": n, "seconds": seconds, "live": live, "ratio": seconds / live}


def checkpoint_stall(rank: int, folder: Path, groups: int, users: int) -> list[dict[str, float]]:
    """Group-commit latency, and its SyncWAL's, without background checkpoints and with one
    every 0.5 s.

    A group is what the HTTP tier commits at once: four unsynced batches of
    256, then one SyncWAL. Both runs serve the same stream in this process,
    one after the other; a checkpoint writes every user changed since the
    last (most of ``users`` at this rate). The first :data:`WARM_UP` groups
    (kernel compilation, a cold cache) are not counted.
    """
    who, what, ratings = synthetic_stream(groups * 1024, users=users, items=2_000, seed=11)
    rows = []
    for interval in (0.0, 0.5):
        config = StoreConfig(cache_users=users, checkpoint_interval=interval)
        store = OnlineStore(folder / f"stall-{interval}")
        durable = DurableModel(synthetic_model(rank), store, config)
        groups_s, syncs_s = [], []
        for start in range(0, len(who), 1024):
            began = time.perf_counter()
            for part in range(start, start + 1024, 256):
                batch = slice(part, part + 256)
                durable.observe(who[batch], what[batch], ratings[batch], sync=False)
            synced = time.perf_counter()
            durable.sync_log()
            done = time.perf_counter()
            groups_s.append(done - began)
            syncs_s.append(done - synced)
        durable.close()
        group, sync = (np.array(s[WARM_UP:]) * 1000 for s in (groups_s, syncs_s))
        rows.append(
            {
                "interval": interval,
                "seconds": float(group.sum() / 1000),
                **{f"group p{q}": float(np.percentile(group, q)) for q in (50, 99)},
                **{f"sync p{q}": float(np.percentile(sync, q)) for q in (50, 99)},
            }
        )
    return rows


def _print_stall(rows: list[dict[str, float]]) -> None:
    print(
        "| checkpoints | groups' time s | group p50 ms | group p99 ms | "
        "SyncWAL p50 ms | SyncWAL p99 ms |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        every = f"every {row['interval']} s" if row["interval"] else "none"
        figures = " | ".join(
            f"{row[f'{part} p{q}']:.1f}" for part in ("group", "sync") for q in (50, 99)
        )
        print(f"| {every} | {row['seconds']:.1f} | {figures} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--checkpoints",
        type=int,
        metavar="GROUPS",
        help="only measure GROUPS group commits without and with background checkpoints",
    )
    parser.add_argument("--users", type=int, default=20_000, help="users of --checkpoints")
    args = parser.parse_args(argv)
    if args.checkpoints:
        with tempfile.TemporaryDirectory(prefix="velox-bench-", dir=".") as scratch:
            _print_stall(checkpoint_stall(args.rank, Path(scratch), args.checkpoints, args.users))
        return 0
    with tempfile.TemporaryDirectory(prefix="velox-bench-", dir=".") as scratch:
        rows = group_commit(args.rank, args.repeats, Path(scratch))
        print("| batch | observations/s | per-observation synced writes/s | x baseline |")
        print("|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['batch']} | {row['rate']:,.0f} | {row['baseline']:,.0f} | "
                f"{row['ratio']:.1f} |"
            )
        result = recovery(args.observations, args.rank, Path(scratch))
    print()
    print("| logged observations | recovery s | live apply s | recovery / live |")
    print("|---|---|---|---|")
    print(
        f"| {result['observations']:,} | {result['seconds']:.1f} | {result['live']:.1f} | "
        f"{result['ratio']:.2f} |"
    )
    at_256 = rows[-1]["ratio"]
    if args.check and at_256 < TARGET:
        print(f"group commit at 256 is {at_256:.1f}x the per-observation rate, under {TARGET}x")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
