"""Rating-prediction quality on MovieLens 100K: Velox's ALS against Spark MLlib ALS, tuned alike.

Protocol (issue 4): a random 80/20 split of the ratings with seed 0; each
engine picks its rank and regularisation on a 90/10 split of the training
part (seed 1), from grids of the same size (ranks 10, 20, 50; three
regularisation strengths), then trains on the whole training part and is
scored on the test part. Both run 15 iterations; predictions are clipped to
[1, 5]; a test pair an engine cannot score (MLlib drops unseen users and
items) gets the training mean. Velox is the single-node solver of
``velox train`` (``velox.als.train_als``), scored by the model it serves
(``TrainedModel.predict``); MLlib is ``pyspark.ml``'s ALS on
``local[2]``.

Usage: ``python -m benchmarks.quality [--data ../shared/data/ml-100k]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from velox.als import ALSParams, Ratings, train_als
from velox.datasets import load_movielens
from velox.evaluation import rmse

RANKS = (10, 20, 50)
VELOX_STRENGTHS = (0.67, 1.0, 1.33)  # times (user 1.5, item 1.0), each scaled by sqrt(n)
MLLIB_REGULARIZATION = (0.05, 0.1, 0.2)  # regParam, scaled by n inside MLlib
ITERATIONS = 15


@dataclass(frozen=True)
class Choice:
    """An engine's pick on the validation split and its score on the test split."""

    engine: str
    rank: int
    regularization: str
    validation_rmse: float
    test_rmse: float
    seconds: float


def split(table: pa.Table, share: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """A random (1 - share, share) split of the rows."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    cut = round(table.num_rows * share)
    return table.take(np.sort(order[cut:])), table.take(np.sort(order[:cut]))


def clipped_rmse(predicted: np.ndarray, truth: np.ndarray) -> float:
    """The protocol's score: predictions clipped to MovieLens' [1, 5] scale first."""
    return rmse(np.clip(predicted, 1.0, 5.0), truth)


def velox_rmse(train: pa.Table, test: pa.Table, rank: int, strength: float) -> float:
    params = ALSParams(
        rank=rank,
        user_regularization=1.5 * strength,
        item_regularization=1.0 * strength,
        regularization_exponent=0.5,
        iterations=ITERATIONS,
        forgetting=1.0,  # unweighted, as MLlib (the shipped age weights are for streams)
    )
    trained = train_als(Ratings.from_table(train), params)
    predicted = trained.predict(test.column("user").to_pylist(), test.column("item").to_pylist())
    return clipped_rmse(predicted, test.column("rating").to_numpy())


def mllib_rmse(spark, train: pa.Table, test: pa.Table, rank: int, reg: float) -> float:
    from pyspark.ml.recommendation import ALS

    def frame(table: pa.Table):
        ints = pa.table(
            {
                "u": table.column("user").cast(pa.int64()),
                "i": table.column("item").cast(pa.int64()),
                "r": table.column("rating"),
                "row": pa.array(np.arange(table.num_rows)),
            }
        )
        return spark.createDataFrame(ints)

    als = ALS(
        rank=rank,
        maxIter=ITERATIONS,
        regParam=reg,
        userCol="u",
        itemCol="i",
        ratingCol="r",
        seed=0,
        coldStartStrategy="nan",
        checkpointInterval=5,
    )
    model = als.fit(frame(train))
    scored = model.transform(frame(test)).select("row", "prediction").toArrow()
    predicted = np.full(test.num_rows, float(np.mean(train.column("rating").to_numpy())))
    values = scored.column("prediction").to_numpy(zero_copy_only=False).astype(float)
    rows = scored.column("row").to_numpy()
    known = np.isfinite(values)
    predicted[rows[known]] = values[known]
    return clipped_rmse(predicted, test.column("rating").to_numpy())


def tune(engine: str, score, grid, train: pa.Table, test: pa.Table) -> Choice:
    """Pick on a 90/10 split of ``train``, then score the pick trained on all of ``train``."""
    started = time.perf_counter()
    fit, held = split(train, 0.1, seed=1)
    scores = {point: score(fit, held, *point) for point in grid}
    best = min(scores, key=scores.get)
    final = score(train, test, *best)
    return Choice(
        engine, best[0], f"{best[1]:g}", scores[best], final, time.perf_counter() - started
    )


VELOX_PICK, MLLIB_PICK = (50, 1.0), (50, 0.1)
"""What the tuning of the recorded run chose (rank, strength or regParam; RESULTS.md)."""


def _parts(data: Path, spark) -> tuple[pa.Table, pa.Table]:
    spark.sparkContext.setCheckpointDir(tempfile.mkdtemp(prefix="velox-quality-"))
    return split(load_movielens(data), 0.2, seed=0)


def picked(data: Path, spark) -> tuple[float, float]:
    """Test RMSE of each engine at the recorded pick: the protocol's last step alone.

    What ``tests/test_quality.py`` asserts, in a fraction of the time of the
    tuning that :func:`compare` repeats.
    """
    train, test = _parts(data, spark)
    return velox_rmse(train, test, *VELOX_PICK), mllib_rmse(spark, train, test, *MLLIB_PICK)


def compare(data: Path, spark) -> list[Choice]:
    """Both engines through the protocol of this module, in one run."""
    train, test = _parts(data, spark)
    return [
        tune("velox", velox_rmse, list(itertools.product(RANKS, VELOX_STRENGTHS)), train, test),
        tune(
            "mllib",
            lambda a, b, rank, reg: mllib_rmse(spark, a, b, rank, reg),
            list(itertools.product(RANKS, MLLIB_REGULARIZATION)),
            train,
            test,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    from batch_jobs.spark import read_spark_defaults, spark_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ml-100k", help="MovieLens 100K folder")
    args = parser.parse_args(argv)
    spark = spark_session("local[2]", read_spark_defaults())
    try:
        choices = compare(Path(args.data), spark)
    finally:
        spark.stop()
    print("| engine | rank | regularisation | validation RMSE | test RMSE | seconds |")
    print("|---|---|---|---|---|---|")
    for c in choices:
        print(
            f"| {c.engine} | {c.rank} | {c.regularization} | {c.validation_rmse:.4f} | "
            f"{c.test_rmse:.4f} | {c.seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
