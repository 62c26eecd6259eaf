"""Log export throughput: ``velox export`` on Beam's DirectRunner against a plain loop, same run.

A store is filled with ``--records`` logged observations over ten days. Then
the same sequence ranges are exported three ways into fresh offline stores:

* **loop**: the baseline, a plain Python loop with no Beam and no checks:
  for each range, read the raw records, decode them, build the Arrow table
  and write one Parquet file per day (:meth:`OfflineStore.write_days`, the
  same files the pipeline writes);
* **beam**: :class:`batch_jobs.export.ExportJob` on the DirectRunner in
  process (validation, dead letters, manifests, report and watermark included);
* **beam x2**: the same with two worker processes
  (``--direct_running_mode=multi_processing --direct_num_workers=2``), their
  start-up included.

Usage: ``python -m benchmarks.export [--records 1000000] [--range-size 100000]
[--check]``. Prints a Markdown table; ``--check`` exits 1 when the in-process
pipeline is more than 3x the loop's time (issue 12).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from batch_jobs.export import ExportJob, RangeLog, plan_ranges
from feature_store.codec import decode_observation
from feature_store.offline import OfflineStore, log_rows
from feature_store.online import OnlineStore
from tests.factories import applied

TARGET = 3.0
START = 1_700_000_000.0


def fill(path: Path, records: int, batch: int = 10_000) -> None:
    """``records`` observations of 100,000 users and 5,000 items over ten days."""
    rng = np.random.default_rng(0)
    with OnlineStore(path) as store:
        for first in range(0, records, batch):
            size = min(batch, records - first)
            users = [f"user{u}" for u in rng.integers(0, 100_000, size)]
            items = [f"item{i}" for i in rng.integers(0, 5_000, size)]
            times = START + (first + np.arange(size)) * (10 * 86_400 / records)
            store.commit(applied(users, items, rng.integers(1, 6, size).astype(float), times))


def loop(online: Path, offline: Path, ranges: list[tuple[int, int]]) -> int:
    """The baseline: the same ranges and files, one after another, without Beam; rows written."""
    store, rows = OfflineStore(offline), 0
    with tempfile.TemporaryDirectory() as scratch, RangeLog(online, scratch) as reader:
        for first, last in ranges:
            table = log_rows(
                (seq, decode_observation(record)) for seq, record in reader.records(first, last)
            )
            rows += sum(store.write_days(table).values())
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--range-size", type=int, default=100_000)
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="velox-bench-", dir=".") as scratch:
        root = Path(scratch)
        fill(root / "online", args.records)
        ranges = plan_ranges(0, args.records, args.range_size)
        began = time.perf_counter()
        assert loop(root / "online", root / "loop", ranges) == args.records
        seconds = {"loop": time.perf_counter() - began}
        for name, options in (
            ("beam", []),
            ("beam x2", ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
        ):
            job = ExportJob(
                root / "online",
                root / name.replace(" ", ""),
                pipeline_args=options,
                range_size=args.range_size,
                emit=lambda _: None,
            )
            began = time.perf_counter()
            report = job.run()
            seconds[name] = time.perf_counter() - began
            assert report.written == args.records, report
    print(f"{args.records:,} log records, ranges of {args.range_size:,}")
    print()
    print("| export | seconds | records/s | x loop time |")
    print("|---|---|---|---|")
    for name, took in seconds.items():
        print(
            f"| {name} | {took:.1f} | {args.records / took:,.0f} | {took / seconds['loop']:.2f} |"
        )
    ratio = seconds["beam"] / seconds["loop"]
    if args.check and ratio > TARGET:
        print(f"the in-process pipeline took {ratio:.2f}x the loop's time, over {TARGET}x")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
