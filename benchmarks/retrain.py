"""Time from a triggered retrain to its swap, phase by phase, in a real ``velox serve``.

A data folder is prepared as a server that has run a while leaves it: v1
trained (Velox ALS, watermark 0) on an earlier slice of the synthetic
generator and active, then ``--observations`` later ratings of the same
generator logged through :class:`~feature_store.durable.DurableModel` in
micro-batches (the server's own open path, ``open_active``; group commit,
one fsync at the end). Then ``velox serve`` runs as a process on 127.0.0.1
with ``train.master=local[2]`` and otherwise its default settings, and
``POST /retrain`` starts a run. The run's record (``GET /models`` →
``retrain.last_run``) gives its phases: ``export`` (``velox export``, Beam),
``train`` (``velox train``, Spark), ``candidate`` (the trained users written
into the other slot), ``catch_up`` (the log after the watermark replayed)
and ``swap``; ``velox_swap_pause_seconds`` in ``/metrics`` is how long the
swap held the live model's writes (target: under one micro-batch, < 5 ms).

Each repeat starts from a copy of the same prepared folder, so every run
exports and trains on the same log; the table gives the median per phase
and each repeat's figure, with the load average when the run ended (the
machines are shared).

Usage: ``python -m benchmarks.retrain [--observations 1000000] [--repeats 3]
[--check]``; ``--check`` exits 1 when a run does not succeed or a swap's
pause is 5 ms or more. :mod:`benchmarks.retrain_load` reuses the folder
preparation and the server handle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
from prometheus_client.parser import text_string_to_metric_families

from feature_store.layout import DataLayout
from feature_store.registry import ModelRegistry
from feature_store.versions import open_active
from velox.als import ALSParams, Ratings, train_als
from velox.backend import get_backend
from velox.config import load_config
from velox.datasets import SyntheticSpec, synthesize
from velox.datasets.schema import seconds

ROOT = Path(__file__).resolve().parent.parent
USERS, ITEMS = 50_000, 2_000
TRAINED_SHARE = 0.1
"""v1 trains on this many ratings per logged one, from before the log (not logged)."""
BATCH = 1024
PAUSE_TARGET_S = 0.005
PHASES = ("export", "train", "candidate", "catch_up", "swap")
_LISTENING = re.compile(r"Running on http://127\.0\.0\.1:([0-9]+)")
_RUN_S = 3600.0


def history(logged: int, later: int = 0, seed: int = 0) -> tuple[pa.Table, pa.Table, pa.Table]:
    """One synthetic stream in time order, cut in three: v1's training, the log, what comes later.

    One spec (one planted truth), so the later ratings come from the same
    users' and items' tastes as the logged ones.
    """
    trained = int(logged * TRAINED_SHARE)
    total = trained + logged + later
    table = synthesize(SyntheticSpec(users=USERS, items=ITEMS, ratings=total, seed=seed))
    return table.slice(0, trained), table.slice(trained, logged), table.slice(trained + logged)


def prepare(data: Path, trained: pa.Table, logged: pa.Table) -> None:
    """v1 trained on ``trained`` and active, then ``logged`` committed to its online store."""
    config = load_config(None, env={}, overrides=[f"data.dir={data}"])
    registry = ModelRegistry(DataLayout(data).registry)
    result = train_als(Ratings.from_table(trained), ALSParams.from_config(config.train))
    with registry.building(engine="velox", watermark=0) as version:
        registry.write_artifacts(version.number, result)
    registry.activate(version.number)
    durable, _ = open_active(config, get_backend(config.compute.device))
    users, items = logged.column("user").to_pylist(), logged.column("item").to_pylist()
    ratings, stamps = logged.column("rating").to_numpy(), seconds(logged)
    with durable:
        for start in range(0, logged.num_rows, BATCH):
            part = slice(start, start + BATCH)
            durable.observe(users[part], items[part], ratings[part], stamps[part], sync=False)
        durable.sync_log()
        assert durable.store.last_seq == logged.num_rows, durable.store.last_seq


class Server:
    """A ``velox serve`` process on 127.0.0.1 over ``data``, its output in ``log_path``."""

    def __init__(self, data: Path, log_path: Path, *settings: str) -> None:
        overrides = [f"data.dir={data}", "train.master=local[2]", *settings]
        command = [str(Path(sys.executable).parent / "velox")]
        for override in overrides:
            command += ["--set", override]
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "serve", "--port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self._port()}"

    def _port(self) -> int:
        """The port the server printed in its start line (port 0: any free one)."""
        while self.process.poll() is None:
            if match := _LISTENING.search(self.log_path.read_text(errors="replace")):
                return int(match[1])
            time.sleep(0.2)
        raise RuntimeError(f"velox serve exited: {self.log_path.read_text(errors='replace')}")

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """The status and JSON (or text) answer of one request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        text = raw.decode()
        return status, json.loads(text) if text.startswith(("{", "[")) else text

    def trigger(self, reason: str) -> str:
        """``POST /retrain``; the id of the run it started."""
        status, answer = self.call("POST", "/retrain", {"reason": reason})
        if status != 202:
            raise RuntimeError(f"POST /retrain answered {status}: {answer}")
        return answer["id"]

    def finished(self, run_id: str, poll: float = 0.5) -> dict:
        """The record of run ``run_id`` once it has an outcome (``GET /models``, polled)."""
        until = time.monotonic() + _RUN_S
        while time.monotonic() < until:
            _, models = self.call("GET", "/models")
            run = models["retrain"]["last_run"]
            if run is not None and run["id"] == run_id and run["outcome"] is not None:
                return run
            if self.process.poll() is not None:
                raise RuntimeError(f"velox serve exited during run {run_id}")
            time.sleep(poll)
        raise RuntimeError(f"run {run_id} did not end within {_RUN_S:g} s")

    def swap_pauses(self) -> tuple[int, float]:
        """How many swaps, and their seconds in all, from ``velox_swap_pause_seconds``."""
        _, text = self.call("GET", "/metrics")
        figures = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("velox_swap_pause_seconds_"):
                    figures[sample.name.rsplit("_", 1)[1]] = sample.value
        return int(figures["count"]), figures["sum"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def one_run(prepared: Path, scratch: Path, number: int) -> dict:
    """Copy the prepared folder, serve it, retrain once; the run's figures."""
    data = scratch / f"data{number}"
    shutil.copytree(prepared, data)
    server = Server(data, scratch / f"serve{number}.log")
    try:
        began = time.perf_counter()
        run = server.finished(server.trigger(f"benchmarks.retrain repeat {number}"))
        waited = time.perf_counter() - began
        swaps, pause = server.swap_pauses()
    finally:
        server.stop()
        shutil.rmtree(data)
    if run["outcome"] != "succeeded":
        raise RuntimeError(f"run {run['id']} {run['outcome']}: {run['reason']}")
    assert swaps == 1, swaps
    return {
        **run["phases"],
        "trigger to swap": run["finished"] - run["started"],
        "client": waited,
        "pause": pause,
        "load": os.getloadavg()[0],
        "gate": run["gate"],
    }


def _print(runs: list[dict], observations: int) -> None:
    print(
        f"{observations:,} logged observations ({USERS:,} users, {ITEMS:,} items), "
        f"v1 trained on {int(observations * TRAINED_SHARE):,} earlier ones; "
        f"train.master=local[2]; {len(runs)} repeat(s)"
    )
    print("| phase | median s | each repeat s |")
    print("|---|---|---|")
    for name in (*PHASES, "trigger to swap", "client"):
        values = [run.get(name, 0.0) for run in runs]
        digits = 4 if name == "swap" else 1
        each = " / ".join(f"{v:.{digits}f}" for v in values)
        print(f"| {name} | {statistics.median(values):.{digits}f} | {each} |")
    pauses = [run["pause"] * 1e3 for run in runs]
    print(
        f"\nswap pause on the write lock (velox_swap_pause_seconds): median "
        f"{statistics.median(pauses):.2f} ms, each {' / '.join(f'{p:.2f}' for p in pauses)} ms"
    )
    print("load average (1 min) at each run's end: " + " / ".join(f"{r['load']:.1f}" for r in runs))
    for run in runs:
        gate = run["gate"]
        if gate:
            print(
                f"gate: candidate RMSE {gate['candidate_rmse']:.4f} vs active "
                f"{gate['active_rmse']:.4f} over {gate['observations']} observations"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="velox-retrain-bench-", dir=".") as scratch:
        root = Path(scratch)
        began = time.perf_counter()
        trained, logged, _ = history(args.observations)
        prepare(root / "prepared", trained, logged)
        print(f"prepared in {time.perf_counter() - began:.1f} s (load {os.getloadavg()[0]:.1f})")
        runs = [one_run(root / "prepared", root, number) for number in range(args.repeats)]
    _print(runs, args.observations)
    slow = [run["pause"] for run in runs if run["pause"] >= PAUSE_TARGET_S]
    if slow:
        print(f"{len(slow)} swap(s) held writes for {PAUSE_TARGET_S * 1e3:g} ms or more")
    return 1 if args.check and slow else 0


if __name__ == "__main__":
    sys.exit(main())
