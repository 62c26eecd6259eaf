"""Spark MLlib's ALS as a second engine, producing the same trained model as Velox's.

MLlib fits ``y - mu ~ x_u . v_i`` (no biases; ``regParam`` scaled by each
row's rating count, MLlib's "ALS-WR"), centred on the same age-weighted ``mu``
as Velox's loop. Its item factors become the version's features
``f(i) = [v_i, 1]`` with item biases 0, and Velox's final user half-step
(:func:`velox.als.finish`) gives every user's weights and sufficient
statistics, so the serving tier continues online from an MLlib model exactly
as from a Velox one.
"""

from __future__ import annotations

import tempfile

import numpy as np

from velox.als import ALSParams, LocalExecutor, Ratings, finish, row_regularization
from velox.backend import Backend
from velox.trained import TrainedModel


def train_mllib(
    spark, indexed, ratings: Ratings, params: ALSParams, backend: Backend
) -> TrainedModel:
    """Fit MLlib ALS on ``indexed`` (uidx, iidx, rating) and finish with a Velox user half-step.

    ``ratings`` are the same ratings on the driver (dense indices as in
    ``indexed``), for the user statistics.
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    executor = LocalExecutor(ratings, backend)
    totals = executor.totals(params.forgetting)
    mu = totals.global_mean
    with tempfile.TemporaryDirectory(prefix="velox-mllib-") as checkpoints:
        # A checkpoint every few iterations cuts the lineage that overflows the driver's stack.
        spark.sparkContext.setCheckpointDir(checkpoints)
        als = ALS(
            rank=params.rank,
            maxIter=params.iterations,
            regParam=params.item_regularization,
            userCol="uidx",
            itemCol="iidx",
            ratingCol="centered",
            seed=params.seed,
            checkpointInterval=5,
            coldStartStrategy="drop",
        )
        model = als.fit(indexed.withColumn("centered", F.col("rating") - mu))
        items = model.itemFactors.toArrow()
    factors = np.zeros((ratings.shape[1], params.rank))
    rows = items.column("id").to_numpy()
    factors[rows] = np.stack(items.column("features").to_numpy(zero_copy_only=False))
    reg = row_regularization(
        totals.user_weight, params.user_regularization, params.regularization_exponent
    )
    return finish(executor, totals, factors, np.zeros(ratings.shape[1]), reg)
