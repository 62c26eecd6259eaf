"""Observe's p99 at 16 connections on fresh and on warmed servers (issue 12's latency figure).

``benchmarks/serve.py`` takes observe's half-peak p99 after three rounds of
saturation on one server; this separates what the server's history adds.
Each variant gets a fresh data folder and a ``velox serve`` of its own
(the model of ``benchmarks/serve.py``), variants alternate within each round:

* ``fresh``: 3 s of observe at 64 connections, then the measured 10 s at 16;
* ``fresh, no checkpoints``: the same with ``store.checkpoint_interval = 0``;
* ``warm, trigger N``: 30 s of observe at 64 connections first, with the state
  families' level-0 compaction trigger at N (1 is what ``keyspace.family_options``
  ships; 4 is RocksDB's default), to see whether compaction after every
  checkpoint flush is what a warm server pays.

Usage: ``python -m benchmarks.observe_warm [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.serve import _port, _publish, _wrk

ROOT = Path(__file__).resolve().parent.parent
_LAUNCH = """
import sys
import rocksdict
import feature_store.online as online
from feature_store import keyspace
def options():
    chosen = {{}}
    for name in keyspace.COLUMN_FAMILIES:
        chosen[name] = rocksdict.Options(raw_mode=True)
        if name in keyspace.STATE_FAMILIES:
            chosen[name].set_level_zero_file_num_compaction_trigger({trigger})
    return chosen
online.family_options = options
from velox.cli import main
sys.exit(main())
"""
VARIANTS = {  # name: (warm-up seconds, checkpoint interval, compaction trigger)
    "fresh": (3, 10.0, 1),
    "fresh, no checkpoints": (3, 0.0, 1),
    "warm, trigger 1": (30, 10.0, 1),
    "warm, trigger 4": (30, 10.0, 4),
}


def measure(scratch: Path, name: str, round_: int) -> dict:
    warm, interval, trigger = VARIANTS[name]
    root = scratch / f"{round_}-{name.replace(' ', '_').replace(',', '')}"
    root.mkdir()
    _publish(root)
    settings = ["--set", f"data.dir={root}", "--set", f"store.checkpoint_interval={interval}"]
    command = [sys.executable, "-c", _LAUNCH.format(trigger=trigger), *settings]
    server = subprocess.Popen(
        [*command, "serve", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = _port(server)
        _wrk(port, "observe", warm, 64, scratch)
        return _wrk(port, "observe", 10, 16, scratch)
    finally:
        server.terminate()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        for round_ in range(args.rounds):
            for name in VARIANTS:
                runs[name].append(measure(scratch, name, round_))
    print("| variant | observe/s at 16 connections | p50 ms | p99 ms (each round) |")
    print("|---|---|---|---|")
    for name, results in runs.items():
        each = " / ".join(f"{r['p99']:.2f}" for r in results)
        print(
            f"| {name} | {statistics.median(r['rate'] for r in results):,.0f} | "
            f"{statistics.median(r['p50'] for r in results):.2f} | "
            f"{statistics.median(r['p99'] for r in results):.2f} ({each}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
