"""What one full garbage collection costs the serving process, with and without ``gc.freeze``.

A full collection runs on the event loop and stalls every request in flight.
This builds the serving application of ``benchmarks/serve.py`` (its model,
rank 32) and starts it in process, which loads the modules, compiles the
kernels and freezes what lives as long as the server (``serving/app.py``,
``_settled_ctx``). It then times ``gc.collect()`` with those objects
unfrozen (the baseline: what the loop paid before) and frozen, alternating,
``--repeats`` times each, and prints the medians and the objects the
collector walks in each case.

Usage: ``python -m benchmarks.gc_pause [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from benchmarks.serve import _publish
from serving.app import create_app
from velox.config import load_config


def _full_collection() -> float:
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


async def _measure(root: Path, repeats: int) -> dict:
    runner = web.AppRunner(create_app(load_config(None, overrides=[f"data.dir={root}"])))
    await runner.setup()  # the app's startup: model, kernels, then the freeze
    try:
        times: dict[str, list[float]] = {"unfrozen": [], "frozen": []}
        for _ in range(repeats):
            gc.unfreeze()
            times["unfrozen"].append(_full_collection())
            walked = len(gc.get_objects())
            gc.freeze()
            times["frozen"].append(_full_collection())
        return {
            "walked unfrozen": walked,
            "walked frozen": len(gc.get_objects()),
            **{name: statistics.median(values) * 1e3 for name, values in times.items()},
        }
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="velox-gc-bench-", dir=".") as scratch:
        _publish(Path(scratch))
        result = asyncio.run(_measure(Path(scratch), args.repeats))
    print(f"full collection, median of {args.repeats}, the serving process (rank-32 model):")
    print("| objects | walked | gc.collect() ms |")
    print("|---|---|---|")
    print(f"| unfrozen (baseline) | {result['walked unfrozen']:,} | {result['unfrozen']:.2f} |")
    print(f"| frozen | {result['walked frozen']:,} | {result['frozen']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
