"""The log's lifecycle under load: disk and recovery time stay flat with export and retention.

A writer process serves ``--observations`` through a :class:`DurableModel`
with group commit (unsynced micro-batches of 256, one SyncWAL per four, as
the HTTP tier logs them) and background checkpoints every second. Every
``--every`` observations the run pauses the stream: ``velox export``'s
pipeline (:class:`batch_jobs.export.ExportJob`, DirectRunner) copies the log
to the offline store beside the live writer, then the writer runs a
retention pass (:meth:`DurableModel.trim`), logs ``--tail`` more
observations and is killed with SIGKILL. The next writer's recovery is
timed (it replays what the last checkpoint did not cover), and it carries on.

Per round it prints the online store's size on disk at its peak (the
round's records logged and exported, before the trim) and after the trim
(with the table files of the user states and of the rated index, which
grows with the distinct (user, item) pairs), the log's extent, and the
recovery time. ``--check`` exits 1 when a later
peak is over 1.5x the first (issue 12).

Usage: ``python -m benchmarks.lifecycle [--observations 2000000] [--every 200000]
[--tail 20000] [--users 20000] [--items 2000] [--rank 8] [--check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch_jobs.export import ExportJob
from benchmarks.store import synthetic_model, synthetic_stream
from feature_store.durable import DurableModel
from feature_store.layout import DataLayout
from feature_store.online import OnlineStore
from velox.config import RegistryConfig, ServeConfig, StoreConfig

BATCH = 256
BOUND = 1.5


def _serve(durable: DurableModel, n: int, seed: int, users: int, items: int) -> None:
    """Log ``n`` observations by group commit: four unsynced batches, then one SyncWAL."""
    who, what, ratings = synthetic_stream(n, users, items, seed)
    for start in range(0, n, BATCH):
        part = slice(start, start + BATCH)
        durable.observe(who[part], what[part], ratings[part], sync=False)
        if (start // BATCH) % 4 == 3:
            durable.sync_log()
    durable.sync_log()


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def writer(args: argparse.Namespace) -> None:
    """The served process: recover (timed), log a round, trim when told, log a tail, wait."""
    began = time.perf_counter()
    config = StoreConfig(cache_users=args.users, checkpoint_interval=1.0)
    store = OnlineStore(DataLayout(Path(args.data)).online)
    durable = DurableModel(synthetic_model(args.rank, args.items), store, config)
    _say({"recovered": durable.recovered, "seconds": time.perf_counter() - began})
    seed = 2 * args.round
    _serve(durable, args.every - args.tail, seed, args.users, args.items)
    _say({"logged": durable.store.last_seq})
    sys.stdin.readline()  # the export ran
    done = durable.trim(RegistryConfig().keep, ServeConfig().idempotency_ttl)
    families = {name: durable.store._cf[name] for name in ("users", "rated")}
    _say(
        {
            "log_start": done.log_start,
            "holder": done.holds.holder,
            **{
                name: family.property_int_value("rocksdb.total-sst-files-size")
                for name, family in families.items()
            },
        }
    )
    sys.stdin.readline()  # the size was measured
    _serve(durable, args.tail, seed + 1, args.users, args.items)
    _say({"tail": durable.store.last_seq})
    sys.stdin.readline()  # never answered: SIGKILL comes first


def _disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _round(args: argparse.Namespace, data: Path, number: int) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.lifecycle", "--writer", str(data)]
    command += ["--round", str(number)] + [
        f"--{name}={getattr(args, name)}" for name in ("every", "tail", "users", "items", "rank")
    ]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def heard() -> dict:
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"the writer of round {number} died (exit {child.wait()})")
        return json.loads(line)

    def tell() -> None:
        child.stdin.write("go\n")
        child.stdin.flush()

    recovery = heard()
    logged = heard()["logged"]
    began = time.perf_counter()
    layout = DataLayout(data)
    ExportJob(layout.online, layout.offline, emit=lambda _: None).run()
    export = time.perf_counter() - began
    peak = _disk(layout.online)
    tell()
    trimmed = heard()
    after = _disk(layout.online)
    tell()
    heard()  # the tail is logged
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return {
        "round": number + 1,
        "logged": logged,
        "recovered": recovery["recovered"],
        "recovery_s": recovery["seconds"],
        "export_s": export,
        "peak_mb": peak / 1e6,
        "after_mb": after / 1e6,
        "users_mb": trimmed["users"] / 1e6,
        "rated_mb": trimmed["rated"] / 1e6,
        "log_start": trimmed["log_start"],
        "holder": trimmed["holder"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=2_000_000)
    parser.add_argument("--every", type=int, default=200_000)
    parser.add_argument("--tail", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="exit 1 when the bound is missed")
    parser.add_argument("--writer", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writer:
        args.data = args.writer
        writer(args)
        return 0
    print(
        "| round | logged up to | recovered records | recovery s | export s | "
        "peak MB | after trim MB | users MB | rated MB | log starts at | held by |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="velox-lifecycle-", dir=".") as scratch:
        for number in range(args.observations // args.every):
            row = _round(args, Path(scratch) / "data", number)
            rows.append(row)
            print(
                f"| {row['round']} | {row['logged']:,} | {row['recovered']:,} | "
                f"{row['recovery_s']:.2f} | {row['export_s']:.1f} | {row['peak_mb']:.1f} | "
                f"{row['after_mb']:.1f} | {row['users_mb']:.1f} | {row['rated_mb']:.1f} | "
                f"{row['log_start']:,} | {row['holder']} |",
                flush=True,
            )
    worst = max(row["peak_mb"] for row in rows) / rows[0]["peak_mb"]
    print(f"\nlargest peak / first peak: {worst:.2f} (bound {BOUND})")
    if args.check and worst > BOUND:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
