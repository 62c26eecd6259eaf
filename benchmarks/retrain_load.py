"""A retrain under continuous load: no failed or degraded answer, no lost observation, no spike.

The data folder is :mod:`benchmarks.retrain`'s (v1 active, ``--observations``
logged); ``velox serve`` runs on 127.0.0.1 with ``train.master=local[2]`` and
otherwise its default settings (the 50 ms deadline included). ``--clients``
processes, each an :class:`~velox.client.AsyncClient` with no retries (a
retried failure would hide one), repeat a cycle ``--rate`` times a second:
observe one rating, predict 10 catalogue items for its user, top-10 for that
user. Every request's start time, latency, outcome, ``degraded`` flag and
answering version are recorded client-side.

After ``--warm-up`` seconds ``POST /retrain`` starts a run: export, Spark,
candidate, gate and swap all happen under the load, which goes on until
``--after`` seconds past the run's end and at least ``--seconds`` in all.
The swap's moment is the first request answered by the new version.

The observations are new users' ratings of distinct (user, item) pairs
(training keeps the latest rating of a pair, so a repeated pair would count
once in the trained state): by default the synthetic generator's ratings
after the logged ones, their users renamed ``L<user>``; with ``--data``,
MovieLens 100K in time order (user ``n`` as ``ml<n>``, item ``n`` as
``i<n-1>``, onto the 2,000-item catalogue). Each client takes the users
whose id hashes to it, in time order.

Checks (``--check`` exits 1 when one fails):

* zero failed requests and zero degraded answers;
* the run succeeded, and the observations in the states of every user
  observed (``GET /users/{id}`` after the swap) add up to the acknowledged count;
* the p99 of predict, and of observe, over the 10 seconds around the swap is
  within 2x its steady p99 (requests from 5 s after the start to the trigger,
  and from 5 s after the swap to the end).

Usage: ``python -m benchmarks.retrain_load [--observations 200000] [--clients 4]
[--rate 20] [--seconds 120] [--warm-up 40] [--after 40] [--data ../shared/data/ml-100k]
[--records FILE] [--check]``; ``--records`` keeps every request's record for a closer look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.retrain import ITEMS, Server, history, prepare
from velox.client import AsyncClient, Observation
from velox.datasets.schema import seconds

AROUND_S = 5.0
"""Half the window around the swap."""
SETTLE_S = 5.0
"""Seconds after the start, and after the swap, left out of the steady figures."""
SPIKE = 2.0
KINDS = ("observe", "predict", "topk")

Row = tuple[str, str, float, float]
"""user, item, rating, ts."""


def synthetic_stream(later: pa.Table) -> list[Row]:
    """The generator's ratings after the logged ones, users renamed, each pair once."""
    return _distinct(
        zip(
            ("L" + user for user in later.column("user").to_pylist()),
            later.column("item").to_pylist(),
            later.column("rating").to_pylist(),
            seconds(later).tolist(),
            strict=True,
        )
    )


def movielens_stream(folder: Path) -> list[Row]:
    """MovieLens 100K in time order, its ids mapped as the module docstring says."""
    from velox.datasets import load_movielens

    table = load_movielens(folder).sort_by("ts")
    return _distinct(
        zip(
            (f"ml{user}" for user in table.column("user").to_pylist()),
            (f"i{(int(item) - 1) % ITEMS}" for item in table.column("item").to_pylist()),
            table.column("rating").to_pylist(),
            seconds(table).tolist(),
            strict=True,
        )
    )


def _distinct(rows) -> list[Row]:
    seen: set[tuple[str, str]] = set()
    out = []
    for user, item, rating, ts in rows:
        if (user, item) not in seen:
            seen.add((user, item))
            out.append((user, item, float(rating), float(ts)))
    return out


def split(stream: list[Row], clients: int) -> list[list[Row]]:
    """Each client's share: the users whose id hashes to it, in time order."""
    parts: list[list[Row]] = [[] for _ in range(clients)]
    for row in stream:
        parts[zlib.crc32(row[0].encode()) % clients].append(row)
    return parts


# --------------------------------------------------------------------- clients


def client(url: str, rows: list[Row], rate: float, stop, out: str) -> None:
    """One client process: the cycle of the module docstring until ``stop``; records to ``out``."""
    records, acked = asyncio.run(_drive(url, rows, rate, stop))
    Path(out).write_text(json.dumps({"records": records, "acked": acked}))


async def _drive(url: str, rows: list[Row], rate: float, stop) -> tuple[list, list]:
    records: list[list] = []  # kind, start (epoch s), seconds, ok, degraded, version, error
    acked: list[list[str]] = []
    catalogue = [f"i{j}" for j in range(ITEMS)]
    pick = random.Random(zlib.crc32(url.encode()) + len(rows))
    async with AsyncClient(url, retries=0, timeout=10.0) as velox:
        due = time.monotonic()
        for user, item, rating, ts in rows:
            if stop.is_set():
                break
            calls = (
                ("observe", velox.observe(Observation(user, item, rating, ts))),
                ("predict", velox.predict(user, pick.sample(catalogue, 10))),
                ("topk", velox.topk(user, 10)),
            )
            for kind, call in calls:
                answer = await _timed(records, kind, call)
                if kind == "observe" and answer is not None:
                    acked.append([user, item])
            due += 1.0 / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        else:
            records.append(["exhausted", time.time(), 0.0, False, False, None, "rows ran out"])
    return records, acked


async def _timed(records: list, kind: str, call):
    """Await ``call``, recording it; its answer, or None when it failed."""
    start, began = time.time(), time.perf_counter()
    try:
        answer = await call
    except Exception as exc:  # every failure counts; none may stop the load
        records.append([kind, start, time.perf_counter() - began, False, False, None, repr(exc)])
        return None
    degraded = bool(getattr(answer, "degraded", False))
    version = getattr(answer, "version", None)
    records.append([kind, start, time.perf_counter() - began, True, degraded, version, None])
    return answer


# ------------------------------------------------------------------------- run


def run_load(args: argparse.Namespace, root: Path) -> dict:
    """Prepare, serve, load, retrain under the load, check the states; the figures."""
    trained, logged, later = history(args.observations, later=args.later)
    prepare(root / "data", trained, logged)
    stream = movielens_stream(Path(args.data)) if args.data else synthetic_stream(later)
    parts = split(stream, args.clients)
    server = Server(root / "data", root / "serve.log")
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    outs = [str(root / f"client{n}.json") for n in range(args.clients)]
    processes = [
        context.Process(target=client, args=(server.url, part, args.rate, stop, out))
        for part, out in zip(parts, outs, strict=True)
    ]
    load = {"start": os.getloadavg()[0]}
    try:
        for process in processes:
            process.start()
        began = time.time()
        time.sleep(args.warm_up)
        triggered, load["trigger"] = time.time(), os.getloadavg()[0]
        run = server.finished(server.trigger("benchmarks.retrain_load"))
        ended, load["run end"] = time.time(), os.getloadavg()[0]
        time.sleep(max(began + args.seconds, ended + args.after) - time.time())
        stop.set()
        for process in processes:
            process.join(timeout=60)
        load["end"] = os.getloadavg()[0]
        results = [json.loads(Path(out).read_text()) for out in outs]
        records = [r for result in results for r in result["records"]]
        acked = [tuple(a) for result in results for a in result["acked"]]
        counted = _counted(server, acked)
        swaps, pause = server.swap_pauses()
    finally:
        stop.set()
        server.stop()
    return {
        "run": run,
        "records": records,
        "acked": len(acked),
        "counted": counted,
        "began": began,
        "triggered": triggered,
        "ended": ended,
        "load": load,
        "swaps": swaps,
        "pause": pause,
        "stream": "MovieLens 100K in time order" if args.data else "synthetic",
    }


def _counted(server: Server, acked: list[tuple[str, str]]) -> int:
    """The observations held in the states of every user with an acknowledged one."""
    total = 0
    for user in sorted({user for user, _ in acked}):
        status, state = server.call("GET", f"/users/{user}")
        if status != 200:
            raise RuntimeError(f"GET /users/{user} answered {status}: {state}")
        total += state["observations"]
    return total


def report(figures: dict) -> list[str]:
    """Print the figures; the checks that failed."""
    run, records = figures["run"], figures["records"]
    new = run["version"]
    answered_new = [r[1] for r in records if r[3] and r[5] == new]
    swap = min(answered_new) if answered_new else float("inf")
    began, triggered = figures["began"], figures["triggered"]

    def p99(kind: str, inside) -> tuple[float, int]:
        times = [r[2] for r in records if r[0] == kind and r[3] and inside(r[1])]
        return (float(np.percentile(times, 99)) * 1e3 if times else float("nan")), len(times)

    def steady(t: float) -> bool:
        return began + SETTLE_S <= t < triggered or t > swap + SETTLE_S

    windows = {
        "steady": steady,
        "during the run, before the swap": lambda t: triggered <= t < swap - AROUND_S,
        "10 s around the swap": lambda t: abs(t - swap) <= AROUND_S,
    }
    failed = Counter(r[0] for r in records if not r[3])
    degraded = sum(1 for r in records if r[4])
    errors = Counter(r[6] for r in records if r[6])
    span = max(r[1] for r in records) - began
    print(
        f"{figures['stream']} observations; {len(records):,} requests over {span:.0f} s; "
        f"run {run['id']}: {run['outcome']} ({run['reason']})"
    )
    print(
        "phases s: "
        + ", ".join(f"{name} {seconds:.3f}" for name, seconds in run["phases"].items())
        + f"; trigger to end {figures['ended'] - triggered:.1f} s (client)"
    )
    print(
        f"swap pause on the write lock: {figures['pause'] * 1e3:.2f} ms ({figures['swaps']} swap)"
    )
    print("load average: " + ", ".join(f"{k} {v:.1f}" for k, v in figures["load"].items()))
    print(f"failed requests: {sum(failed.values())} {dict(failed)}; degraded answers: {degraded}")
    for error, count in errors.most_common(3):
        print(f"  {count} x {error}")
    print(
        f"observations acknowledged {figures['acked']:,}; held in the users' states after the "
        f"swap {figures['counted']:,}"
    )
    print(
        "| request | "
        + " | ".join(f"p99 ms {name} (n)" for name in windows)
        + " | around / steady |"
    )
    print("|---|" + "---|" * (len(windows) + 1))
    problems = []
    for kind in KINDS:
        figures_of = {name: p99(kind, inside) for name, inside in windows.items()}
        ratio = figures_of["10 s around the swap"][0] / figures_of["steady"][0]
        cells = " | ".join(f"{p:.1f} ({n})" for p, n in figures_of.values())
        print(f"| {kind} | {cells} | {ratio:.2f} |")
        if kind != "topk" and not ratio <= SPIKE:
            problems.append(f"{kind} p99 around the swap is {ratio:.2f}x steady (over {SPIKE}x)")
    if run["outcome"] != "succeeded":
        problems.append(f"the run {run['outcome']}")
    if failed or degraded:
        problems.append(f"{sum(failed.values())} failed requests, {degraded} degraded answers")
    if figures["acked"] != figures["counted"]:
        problems.append("the users' states do not hold every acknowledged observation")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=200_000, help="logged before")
    parser.add_argument("--later", type=int, default=100_000, help="synthetic rows to draw from")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="cycles a second per client")
    parser.add_argument("--seconds", type=float, default=120.0, help="least time under load")
    parser.add_argument("--warm-up", type=float, default=40.0, help="seconds before the trigger")
    parser.add_argument("--after", type=float, default=40.0, help="seconds after the run")
    parser.add_argument("--data", help="MovieLens 100K folder: its ratings in time order")
    parser.add_argument("--records", help="write every request's record and the run here (JSON)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="velox-retrain-load-", dir=".") as scratch:
        figures = run_load(args, Path(scratch))
    if args.records:
        Path(args.records).write_text(json.dumps(figures))
    problems = report(figures)
    for problem in problems:
        print(problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
