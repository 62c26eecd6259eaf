"""Spark MLlib's ALS as a second engine, producing the same artifact as Velox's.

MLlib fits ``y - mu ~ x_u . v_i`` (no biases; ``regParam`` scaled by each
row's rating count, MLlib's "ALS-WR"). Its item factors become the version's
features ``f(i) = [v_i, 1]`` with item biases 0, and one Velox user half-step
over them gives every user's weights and sufficient statistics, so the
serving tier continues online from an MLlib model exactly as from a Velox one.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np

from velox.als import ALSParams, ALSResult, Ratings, RowIndex, half_step, row_regularization
from velox.backend import Backend

log = logging.getLogger(__name__)


def train_mllib(spark, indexed, ratings: Ratings, params: ALSParams, backend: Backend) -> ALSResult:
    """Fit MLlib ALS on ``indexed`` (uidx, iidx, rating) and finish with a Velox user half-step.

    ``ratings`` are the same ratings on the driver (dense indices as in
    ``indexed``), for the user statistics.
    """
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    n_users, n_items = ratings.shape
    mu = float(ratings.values.mean())
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
    factors = np.zeros((n_items, params.rank))
    rows = items.column("id").to_numpy()
    factors[rows] = np.stack(items.column("features").to_numpy(zero_copy_only=False))
    features = np.hstack([factors, np.ones((n_items, 1))])
    weights = np.ones(ratings.values.size)
    reg = row_regularization(
        ratings.users, weights, n_users, params.user_regularization, params.regularization_exponent
    )
    index = RowIndex.build(ratings.users, ratings.items, n_users)
    targets = ratings.values - mu
    A, b, w = half_step(index, targets, weights, features, reg, backend)
    residual = targets - np.einsum("ij,ij->i", w[ratings.users], features[ratings.items])
    return ALSResult(
        user_ids=ratings.user_ids,
        item_ids=ratings.item_ids,
        global_mean=mu,
        item_factors=factors,
        item_bias=np.zeros(n_items),
        user_weights=w,
        user_gram=A,
        user_rhs=b,
        user_count=np.bincount(ratings.users, minlength=n_users),
        train_rmse=float(np.sqrt(np.mean(residual**2))),
    )
