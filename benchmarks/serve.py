"""HTTP throughput and latency of ``velox serve`` against an aiohttp hello-world, with wrk.

Both servers run as processes on 127.0.0.1 in the same run; wrk (Debian
package ``wrk``) drives each scenario for ``--seconds`` with 2 threads:

* **hello**: a one-route aiohttp app answering every POST with a small JSON
  object: the baseline of what aiohttp itself costs here;
* **predict 1**: ``/predict`` of one item; **predict 100**: 100 candidate items;
* **topk all**: ``/topk`` k = 10 over every item;
* **observe**: durable ``/observe`` of one observation per request (random
  users and items), i.e. micro-batched, applied and fsynced before the answer;
* **observe stream**: the same, replaying MovieLens 100K's second half in time
  order (each wrk thread from its own point of it), so users come in bursts as
  real feedback does (skipped when ``--data`` holds no MovieLens 100K).

The scenarios run in ``--rounds`` rounds, each starting with the hello-world,
and every ratio is taken against the hello-world of its own round: the
machines this runs on are shared and their speed drifts by a quarter within
a minute, so one hello-world measured once would skew every ratio after it.
The tables give the median over the rounds (and each round's ratios).

Then the p99 latency of ``predict 1``, and of ``observe``, near half their
peak rates: wrk has no rate limit, so the rate is set by the number of
connections (the smallest count whose rate reaches half the peak, or the
closest). Observe's is then measured ``--latency-runs`` more times at that
count, each run three checkpoint intervals long (``store.checkpoint_interval``,
so every run has background checkpoints in it), and the median is the
figure. Each of those runs also reports how many of the server's group-commit
fsyncs took over 10 and 100 ms (``velox_log_sync_seconds`` in ``/metrics``), and the
disk's own figure comes first: a bare loop appending 200 bytes and
fdatasyncing, with the server idle. The shared VMs this runs on stall on
fsync now and then by themselves (``--disk-only`` runs that loop alone for
``--seconds``), and a run such a stall hits shows it.

wrk's percentiles are corrected for coordinated omission: a response that
took ``n`` times the connection's mean interval also adds the samples a
client sending at a steady rate would have measured meanwhile (wrk 4.1's
``stats_correct``). So one disk stall of 300 ms in a 30 s run at 3,000/s
counts about 900 late requests, not the 8 or 16 that were in flight, and puts
that run's p99 near 100 ms: the figure of an open-loop client, which is what
"p99 at a rate" asks for, and the reason a run's p99 can exceed what its
throughput allows for a closed loop. Beside it, each run gives the server's
own, uncorrected count (``velox_request_seconds``): the share of its observes
answered within 10 ms of their arrival in the handler.

Usage: ``python -m benchmarks.serve [--seconds 10] [--rounds 3] [--connections 64]
[--latency-runs 3] [--data ../shared/data/ml-100k] [--check]``, or
``python -m benchmarks.serve --disk-only [--seconds 10]``. ``--check``
exits 1 when a target is missed by the medians (issue 5: predict 1 >= 0.6x
hello; observe at 64 connections >= 0.4x hello; p99 of predict < 5 ms at half
its peak rate; issue 12: p99 of observe <= 10 ms at half its peak rate).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from velox.als import ALSParams, Ratings, train_als
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize

ROOT = Path(__file__).resolve().parent.parent
USERS, ITEMS = 2_000, 1_000

_HELLO = """
import socket
from aiohttp import web
async def hello(request):
    await request.read()
    return web.json_response({"hello": "world"})
app = web.Application()
app.router.add_post("/{tail:.*}", hello)
sock = socket.create_server(("127.0.0.1", 0))
web.run_app(app, sock=sock, print=lambda text: print(text, flush=True), access_log=None)
"""
_LISTENING = re.compile(r"Running on http://127\.0\.0\.1:([0-9]+)")

_HUNDRED = '{"user": "u1", "items": [' + ", ".join(f'"i{j}"' for j in range(100)) + "]}"
_LUA = {
    "hello": 'wrk.method = "POST"; wrk.body = \'{"user": "u1", "items": ["i1"]}\'',
    "predict 1": 'wrk.method = "POST"; wrk.body = \'{"user": "u1", "items": ["i1"]}\'',
    "predict 100": f"wrk.method = \"POST\"; wrk.body = '{_HUNDRED}'",
    "topk all": 'wrk.method = "POST"; wrk.body = \'{"user": "u1", "k": 10}\'',
    "observe": """wrk.method = "POST"
request = function()
  local body = string.format('{"user": "u%d", "item": "i%d", "rating": %d}',
    math.random(0, 1999), math.random(0, 999), math.random(1, 5))
  return wrk.format(nil, "/observe", nil, body)
end""",
}
_PATHS = {"hello": "/", "predict 1": "/predict", "predict 100": "/predict", "topk all": "/topk"}
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def _stream_lua(data: Path) -> str | None:
    """A wrk script replaying MovieLens' second half by time, or None without the data.

    The ratings go into the script as a Lua table; each wrk thread starts at
    its own point and walks on in time order (no ``ts``: the server's clock).
    MovieLens' ids are mapped onto the served model's (user ``n`` to ``u{n-1}``,
    item ``n`` to ``i{(n-1) mod 1000}``): the bursts are MovieLens', the
    catalogue stays the benchmark's, so the other scenarios are not measured
    over thousands of items folded in by this one.
    """
    if not (data / "u.data").is_file():
        return None
    from velox.datasets import load_movielens
    from velox.evaluation.protocols import temporal

    _, stream = temporal(load_movielens(data), 0.5)
    rows = zip(
        stream.column("user").to_pylist(),
        stream.column("item").to_pylist(),
        stream.column("rating").to_pylist(),
        strict=True,
    )
    table = ",\n".join(f'{{"u{int(u) - 1}","i{(int(i) - 1) % ITEMS}",{r:g}}}' for u, i, r in rows)
    return f"""wrk.method = "POST"
local obs = {{
{table}
}}
local threads = 0
function setup(thread)
  thread:set("start", threads * 7919)
  threads = threads + 1
end
local at = nil
request = function()
  at = ((at or start) % #obs) + 1
  local o = obs[at]
  local body = string.format('{{"user": "%s", "item": "%s", "rating": %s}}', o[1], o[2], o[3])
  return wrk.format(nil, "/observe", nil, body)
end"""


def _publish(root: Path) -> None:
    spec = SyntheticSpec(users=USERS, items=ITEMS, ratings=100_000, seed=0)
    result = train_als(Ratings.from_table(synthesize(spec)), ALSParams(rank=32, iterations=5))
    registry = ModelRegistry(DataLayout(root).registry)
    with registry.building(engine="velox", watermark=0) as version:
        registry.write_artifacts(version.number, result)
    registry.activate(version.number)


def _port(process: subprocess.Popen) -> int:
    """The port a server started with port 0 says it listens on (aiohttp's start line)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if match := _LISTENING.search(line):
            # Keep reading, so that a server never blocks on a full pipe.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return int(match[1])
    raise RuntimeError("a server exited: " + "".join(lines))


def _wrk(port: int, scenario: str, seconds: int, connections: int, scratch: Path) -> dict:
    script = scratch / f"{scenario.replace(' ', '_')}.lua"
    script.write_text(_LUA[scenario])
    url = f"http://127.0.0.1:{port}{_PATHS.get(scenario, '/observe')}"
    done = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    if errors:
        raise RuntimeError(f"{scenario}: {errors.group(1)} error responses\n{done.stdout}")
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", done.stdout, re.M))
    longest = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+\w+)", done.stdout, re.M)
    return {
        "rate": rate,
        "p50": _ms(percentiles["50"]),
        "p99": _ms(percentiles["99"]),
        "max": _ms(longest.group(1)),
    }


_SCENARIOS = ("hello", "predict 1", "predict 100", "topk all", "observe", "observe stream")


def _round(hello: int, velox: int, seconds: int, connections: int, scratch: Path) -> dict:
    """Every scenario once, the hello-world first (its own baseline)."""
    return {
        name: _wrk(hello if name == "hello" else velox, name, seconds, connections, scratch)
        for name in _SCENARIOS
        if name in _LUA
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def _p99_at_half_peak(
    port: int, peak: float, seconds: int, scratch: Path, scenario: str = "predict 1"
) -> dict:
    """p99 of ``scenario`` with the wrk concurrency whose rate comes closest to half the peak.

    wrk is closed-loop (no rate limit), so the offered rate is set by the
    number of connections: 1, 2, 4, ... until the rate passes half the peak.
    """
    best = None
    for connections in (1, 2, 4, 8, 16, 32):
        run = _wrk(port, scenario, seconds, connections, scratch)
        run["connections"] = connections
        print(
            f"{scenario} at {connections} connection(s): {run['rate']:,.0f}/s, "
            f"p50 {run['p50']:.2f} ms, p99 {run['p99']:.2f} ms (half its peak: {peak / 2:,.0f}/s)",
            flush=True,
        )
        if best is None or abs(run["rate"] - peak / 2) < abs(best["rate"] - peak / 2):
            best = run
        if run["rate"] >= peak / 2:
            break
    return best


def _tallies(port: int) -> tuple[int, int, int, int, int]:
    """From the server's ``/metrics``: its group-commit fsyncs (all, over 10 ms, over
    100 ms) and its answered observes (all, over 10 ms), so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {
        (sample.name, sample.labels.get("route"), sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in ("velox_log_sync_seconds", "velox_request_seconds")
        for sample in family.samples
        if sample.labels.get("status", "200") == "200"
    }
    syncs = samples[("velox_log_sync_seconds_count", None, None)]
    observes = samples[("velox_request_seconds_count", "/observe", None)]
    return (
        int(syncs),
        int(syncs - samples[("velox_log_sync_seconds_bucket", None, "0.01")]),
        int(syncs - samples[("velox_log_sync_seconds_bucket", None, "0.1")]),
        int(observes),
        int(observes - samples[("velox_request_seconds_bucket", "/observe", "0.01")]),
    )


def _disk_baseline(folder: Path, seconds: float) -> dict:
    """Latency of a bare append of 200 bytes and fdatasync, in a loop: what the disk costs."""
    path = folder / "fsync-probe"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            os.write(descriptor, b"x" * 200)
            started = time.perf_counter()
            os.fdatasync(descriptor)
            times.append(time.perf_counter() - started)
            time.sleep(0.0005)  # about the group commit's pace at half peak
    finally:
        os.close(descriptor)
        path.unlink()
    times.sort()
    return {
        "n": len(times),
        **{f"p{p}": times[int(p / 100 * (len(times) - 1))] * 1e3 for p in (50, 99, 99.9)},
        "max": times[-1] * 1e3,
        "over 10 ms": sum(t > 0.01 for t in times),
    }


def _print_disk(disk: dict, seconds: float, beside: str) -> None:
    print(
        f"the disk alone ({seconds} s of append + fdatasync, {beside}): "
        f"{disk['n']:,} syncs, p50 {disk['p50']:.2f} ms, p99 {disk['p99']:.2f} ms, "
        f"p99.9 {disk['p99.9']:.2f} ms, max {disk['max']:.2f} ms, {disk['over 10 ms']} over 10 ms"
    )


def _observe_latency(port: int, connections: int, seconds: int, runs: int, scratch: Path) -> list:
    """``runs`` runs of observe at ``connections``, each with the server's tallies of it."""
    measured = []
    for _ in range(runs):
        before = _tallies(port)
        run = _wrk(port, "observe", seconds, connections, scratch)
        after = _tallies(port)
        tallies = [a - b for a, b in zip(after, before, strict=True)]
        run["syncs"], run["over 10 ms"], run["over 100 ms"] = tallies[:3]
        run["served within 10 ms"] = 100 * (1 - tallies[4] / tallies[3])
        measured.append(run)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--data", default=str(ML100K), help="MovieLens 100K folder")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--disk-only", action="store_true", help="only the disk's fsync loop")
    args = parser.parse_args(argv)
    if args.disk_only:
        with tempfile.TemporaryDirectory(prefix="velox-disk-bench-", dir=".") as scratch:
            _print_disk(_disk_baseline(Path(scratch), args.seconds), args.seconds, "nothing else")
        return 0
    stream = _stream_lua(Path(args.data))
    if stream is None:
        print(f"no MovieLens 100K at {args.data}: the observe stream scenario is skipped")
    else:
        _LUA["observe stream"] = stream
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk")
        return 2
    with tempfile.TemporaryDirectory(prefix="velox-serve-bench-", dir=".") as scratch:
        root = Path(scratch)
        _publish(root / "data")
        hello = subprocess.Popen(
            [sys.executable, "-c", _HELLO],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        velox = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "velox"),
                "--set",
                f"data.dir={root / 'data'}",
                "serve",
                "--port",
                "0",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            hello_port, velox_port = _port(hello), _port(velox)
            rounds = [
                _round(hello_port, velox_port, args.seconds, args.connections, root)
                for _ in range(args.rounds)
            ]
            peak = statistics.median(r["predict 1"]["rate"] for r in rounds)
            half = _p99_at_half_peak(velox_port, peak, args.seconds, root)
            observe_peak = statistics.median(r["observe"]["rate"] for r in rounds)
            observe_half = _p99_at_half_peak(
                velox_port, observe_peak, args.seconds, root, scenario="observe"
            )
            latency_seconds = round(3 * load_config(None).store.checkpoint_interval)
            disk = _disk_baseline(root, args.seconds)
            observe_runs = _observe_latency(
                velox_port,
                observe_half["connections"],
                latency_seconds,
                args.latency_runs,
                root,
            )
        finally:
            for process in (hello, velox):
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    print(
        f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1, {args.rounds} rounds; "
        f"{USERS} users, {ITEMS} items, rank 32; medians over the rounds"
    )
    print("| scenario | requests/s | x hello-world | each round | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for name in (name for name in _SCENARIOS if name in _LUA):
        runs = [r[name] for r in rounds]
        ratios[name] = statistics.median(r[name]["rate"] / r["hello"]["rate"] for r in rounds)
        each = " / ".join(f"{r[name]['rate'] / r['hello']['rate']:.2f}" for r in rounds)
        print(
            f"| {name} | {statistics.median(r['rate'] for r in runs):,.0f} | "
            f"{ratios[name]:.2f} | {each} | {statistics.median(r['p50'] for r in runs):.2f} | "
            f"{statistics.median(r['p99'] for r in runs):.2f} |"
        )
    p99 = half["p99"]
    print(
        f"\npredict 1 near half its peak: {half['rate']:,.0f}/s with {half['connections']} "
        f"connection(s), p50 {half['p50']:.2f} ms, p99 {p99:.2f} ms"
    )
    observe_p99 = statistics.median(run["p99"] for run in observe_runs)
    print(
        f"observe near half its peak: {observe_half['connections']} connection(s), "
        f"{len(observe_runs)} runs of {latency_seconds} s (checkpoints every "
        f"store.checkpoint_interval): median p99 **{observe_p99:.2f} ms**"
    )
    _print_disk(disk, args.seconds, "server idle")
    print(
        "| run | observe/s | p50 ms | p99 ms | max ms | server: within 10 ms | fsyncs | "
        "over 10 ms | over 100 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for number, run in enumerate(observe_runs, 1):
        print(
            f"| {number} | {run['rate']:,.0f} | {run['p50']:.2f} | {run['p99']:.2f} | "
            f"{run['max']:.1f} | {run['served within 10 ms']:.2f}% | {run['syncs']:,} | "
            f"{run['over 10 ms']} | {run['over 100 ms']} |"
        )
    failures = []
    if ratios["predict 1"] < 0.6:
        failures.append("predict 1 under 0.6x hello-world")
    if ratios["observe"] < 0.4:
        failures.append("observe under 0.4x hello-world")
    if p99 >= 5.0:
        failures.append("predict p99 at half peak is 5 ms or more")
    if observe_p99 > 10.0:
        failures.append("observe p99 at half peak is over 10 ms")
    for failure in failures:
        print(failure)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
