"""Stream-order throughput of online learning: a real stream in time order, shuffled, and River.

Protocol (issue 11): the ratings sorted by time; the first half trains ALS
with the shipped settings (``conf/velox.toml``: ``velox.als.train_als``,
then :meth:`velox.trained.TrainedModel.online_model`); the second half is
streamed prequentially (each rating predicted, then learned) through
:func:`velox.evaluation.prequential` in micro-batches of 64. Measured, as
medians of a few repeats, each from a fresh online model:

* **time order**: the stream as it happened; one user's ratings come in
  bursts, so a micro-batch holds many observations of few users;
* **shuffled**: the same ratings in a random order (seed 0);
* **River** ``BiasedMF`` (online SGD matrix factorisation, River's documented
  MovieLens settings), when River is installed (``pip install .[bench]``):
  it learns the first half once, in time order, then predicts and learns
  the stream one rating at a time, in the same process and run.

Reported per data set: observations learnt per second and the stream RMSE
(unclipped, as :func:`velox.evaluation.prequential` scores it) of each, the
ratio of Velox in time order to River, and to the 6k observations per
second that the round-by-round apply reached before (issue 11). Two data
sets: MovieLens 100K (``--data``, default ``../shared/data/ml-100k`` or
``$VELOX_ML100K``; skipped with a message when absent, never copied) and the
synthetic generator's stream (:func:`velox.datasets.synthesize`, default
spec).

Usage: ``python -m benchmarks.stream [--data PATH] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from velox import kernels
from velox.als import ALSParams, Ratings, train_als
from velox.config import load_config
from velox.datasets import SyntheticSpec, load_movielens, synthesize
from velox.evaluation import prequential, rmse
from velox.trained import TrainedModel

BATCH = 64
BEFORE = 5_961  # obs/s of the round-by-round apply on the time-ordered ML-100K stream
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@dataclass(frozen=True)
class Run:
    """Median throughput of one policy on one stream, and its stream RMSE."""

    policy: str
    per_second: float
    rmse: float


def temporal_halves(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The first half of the ratings by time (training) and the second (the stream)."""
    ordered = table.take(np.argsort(table.column("ts").cast(pa.int64()).to_numpy(), kind="stable"))
    cut = ordered.num_rows // 2
    return ordered.slice(0, cut), ordered.slice(cut)


def median_run(policy: str, run: Callable[[], float], n: int, repeats: int) -> Run:
    """Time ``run`` (which returns the stream RMSE) ``repeats`` times; the median rate."""
    rates, errors = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        errors.append(run())
        rates.append(n / (time.perf_counter() - started))
    return Run(policy, statistics.median(rates), statistics.median(errors))


def velox_runs(train: pa.Table, stream: pa.Table, repeats: int) -> list[Run]:
    """Velox online, shipped settings: the stream in time order, then shuffled."""
    config = load_config()
    trained: TrainedModel = train_als(
        Ratings.from_table(train), ALSParams.from_config(config.train)
    )
    kernels.warm_up(config.model.dtype)
    shuffled = stream.take(np.random.default_rng(0).permutation(stream.num_rows))
    runs = []
    for policy, part in (("Velox, time order", stream), ("Velox, shuffled", shuffled)):
        models = iter([trained.online_model(version="v", config=config.model)
                       for _ in range(repeats)])  # fmt: skip

        def run(part: pa.Table = part, models=models) -> float:
            return prequential(next(models), part, batch_size=BATCH).rmse

        runs.append(median_run(policy, run, part.num_rows, repeats))
    return runs


def river_run(train: pa.Table, stream: pa.Table, repeats: int) -> Run | None:
    """River ``BiasedMF`` pre-trained on ``train``, then predict-then-learn on ``stream``."""
    try:
        from river import optim, reco
    except ImportError:
        return None
    model = reco.BiasedMF(
        n_factors=10,
        bias_optimizer=optim.SGD(0.025),
        latent_optimizer=optim.SGD(0.05),
        latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=73),
        l2_bias=0.0,
        l2_latent=0.0,
    )
    for user, item, y in _rows(train):
        model.learn_one(user, item, y)
    rows = _rows(stream)
    truth = np.array([y for _, _, y in rows])

    def run() -> float:
        online = copy.deepcopy(model)
        predicted = np.empty(len(rows))
        for j, (user, item, y) in enumerate(rows):
            predicted[j] = online.predict_one(user, item)
            online.learn_one(user, item, y)
        return rmse(predicted, truth)

    return median_run("River BiasedMF", run, len(rows), repeats)


def _rows(table: pa.Table) -> list[tuple[str, str, float]]:
    columns = (table.column(name).to_pylist() for name in ("user", "item", "rating"))
    return list(zip(*columns, strict=True))


def report(name: str, table: pa.Table, repeats: int) -> None:
    """Run every policy on ``table``'s temporal halves and print one Markdown table."""
    train, stream = temporal_halves(table)
    runs = velox_runs(train, stream, repeats)
    river = river_run(train, stream, repeats)
    if river is not None:
        runs.append(river)
    print(f"\n{name}: {train.num_rows} ratings train, {stream.num_rows} streamed, "
          f"batches of {BATCH}, medians of {repeats}")  # fmt: skip
    print("| policy | obs/s | stream RMSE |\n|---|---|---|")
    for run in runs:
        print(f"| {run.policy} | {run.per_second:,.0f} | {run.rmse:.4f} |")
    ordered = runs[0].per_second
    print(f"Velox time order: {ordered / BEFORE:.1f}x the round-by-round 6k obs/s", end="")
    if river is None:
        print("; River is not installed (pip install .[bench]), so no River figure")
    else:
        print(f", {ordered / river.per_second:.2f}x River BiasedMF")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("VELOX_ML100K", str(DEFAULT_DATA)))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = Path(args.data)
    if (data / "u.data").is_file():
        report(f"MovieLens 100K ({data})", load_movielens(data), args.repeats)
    else:
        print(f"MovieLens 100K skipped: no u.data under {data} (set --data or VELOX_ML100K)")
    report("Synthetic (velox.datasets.synthesize, default spec)", synthesize(SyntheticSpec()),
           args.repeats)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
