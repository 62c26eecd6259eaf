"""Stream-order throughput of online learning: a real stream in time order, shuffled, and River.

Protocol (issue 11): the ratings sorted by time; the first half trains ALS
with the shipped settings (``conf/velox.toml``: ``velox.als.train_als``,
then :meth:`velox.trained.TrainedModel.online_model`); the second half is
streamed prequentially (each rating predicted, then learned) through
:func:`velox.evaluation.replay` (the loop of :func:`~velox.evaluation.prequential`
and of ``velox evaluate``) in micro-batches of 64. Measured, as
medians of a few repeats, each from a fresh online model:

* **time order**: the stream as it happened; one user's ratings come in
  bursts, so a micro-batch holds many observations of few users;
* **shuffled**: the same ratings in a random order (seed 0);
* **River** ``BiasedMF`` (online SGD matrix factorisation, the peer of
  ``velox evaluate``: :mod:`velox.evaluation.river_peers`), when River is
  installed (``pip install .[bench]``): it learns the first half once, in
  time order, then predicts and learns the stream one rating at a time, in
  the same process and run.

Reported per data set: observations learnt per second and the stream RMSE
(unclipped, as :func:`velox.evaluation.prequential` scores it; River's
predictions are not clipped either) of each, the
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from velox import kernels
from velox.als import ALSParams, Ratings, train_als
from velox.config import load_config
from velox.datasets import SyntheticSpec, load_movielens, synthesize
from velox.errors import InputError
from velox.evaluation import replay, rmse
from velox.evaluation.river_peers import river_learner
from velox.model import OnlineModel
from velox.trained import TrainedModel

BATCH = 64
BEFORE = 5_961  # obs/s of the round-by-round apply on the time-ordered ML-100K stream
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@dataclass(frozen=True)
class Policy:
    """A learner to measure: ``make`` builds a fresh one (not timed) for ``stream``."""

    name: str
    make: Callable[[], Any]
    stream: pa.Table


@dataclass(frozen=True)
class Run:
    """Median throughput of one policy on its stream, and its stream RMSE."""

    policy: str
    per_second: float
    rmse: float


def temporal_halves(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The first half of the ratings by time (training) and the second (the stream)."""
    ordered = table.take(np.argsort(table.column("ts").cast(pa.int64()).to_numpy(), kind="stable"))
    cut = ordered.num_rows // 2
    return ordered.slice(0, cut), ordered.slice(cut)


def measure(policies: list[Policy], repeats: int) -> list[Run]:
    """Replay each policy's stream ``repeats`` times, the policies in turn; medians.

    Taking the policies in turn within each repeat exposes them to the same
    load on a shared machine, so their ratios hold even when the rates move.
    :func:`velox.evaluation.replay` times only its predict-then-learn loop.
    """
    traces: dict[str, list] = {policy.name: [] for policy in policies}
    for _ in range(repeats):
        for policy in policies:
            traces[policy.name].append(replay(policy.make(), policy.stream, batch_size=BATCH))
    return [
        Run(
            name,
            statistics.median(trace.rate for trace in runs),
            statistics.median(rmse(trace.predictions, trace.ratings) for trace in runs),
        )
        for name, runs in traces.items()
    ]


def velox_policies(train: pa.Table, stream: pa.Table) -> list[Policy]:
    """Velox online, shipped settings: the stream in time order, and shuffled."""
    config = load_config()
    params = ALSParams.from_config(config.train)
    trained: TrainedModel = train_als(Ratings.from_table(train), params)
    kernels.warm_up(config.model.dtype)
    shuffled = stream.take(np.random.default_rng(0).permutation(stream.num_rows))

    def fresh() -> OnlineModel:
        return trained.online_model(version="v", config=config.model)

    return [Policy("Velox, time order", fresh, stream), Policy("Velox, shuffled", fresh, shuffled)]


class TightRiver:
    """River's model stepped with as little Python around it as a loop allows: its best case.

    (:class:`velox.evaluation.river_peers.RiverLearner` converts every rating and
    passes keywords, which costs River about a third of its rate here.)
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def step(self, users, items, ratings, when, learn: bool) -> np.ndarray:
        predict_one, learn_one = self.model.predict_one, self.model.learn_one
        predictions = []
        for user, item, y in zip(users, items, ratings.tolist(), strict=True):
            predictions.append(predict_one(user, item))
            learn_one(user, item, y)
        return np.array(predictions)


def river_policy(train: pa.Table, stream: pa.Table) -> Policy | None:
    """River ``BiasedMF`` pre-trained on ``train``, then predict-then-learn on ``stream``.

    The peer of ``velox evaluate`` (:mod:`velox.evaluation.river_peers`: its
    settings, at the run's rank); each repeat starts from a copy of the
    pre-trained model. None when River is not installed.
    """
    try:
        pretrained = river_learner("mf", train).model
    except InputError:
        return None
    return Policy("River BiasedMF", lambda: TightRiver(copy.deepcopy(pretrained)), stream)


def report(name: str, table: pa.Table, repeats: int) -> None:
    """Run every policy on ``table``'s temporal halves and print one Markdown table."""
    train, stream = temporal_halves(table)
    policies = velox_policies(train, stream)
    river = river_policy(train, stream)
    runs = measure(policies if river is None else [*policies, river], repeats)
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
        print(f", {ordered / runs[-1].per_second:.2f}x River BiasedMF")


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
