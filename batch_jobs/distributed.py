"""Distributed biased ALS: every half-step is a Spark stage over blocks of users or items.

The ratings (dense indices, weights) are cached, hashed into blocks by user
and by item. A half-step broadcasts the other side's features, and each task
solves its block with :func:`velox.als.half_step` (CuPy where the executor
sees a GPU and ``compute.device`` allows it, NumPy otherwise) through
``groupBy(block).applyInArrow``; the driver collects the solutions, which are
the next half-step's broadcast. The arithmetic per row is exactly that of the
single-node mode: same row order, same normal equations, same solver.

Limits: the driver holds both sides' factors (``(users + items) x d``
doubles) and broadcasts one side per half-step; each task holds its block's
ratings and the broadcast side. The final user half-step returns every
user's sufficient statistics (``d(d+1)/2 + d`` doubles per user) to the
driver, which writes them to the registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from velox.als import (
    ALSParams,
    ALSResult,
    Progress,
    RowIndex,
    half_step,
    initial_factors,
    objective,
    row_regularization,
)
from velox.backend import get_backend

log = logging.getLogger(__name__)


def _vectors(values: np.ndarray) -> pa.ListArray:
    """Rows of a matrix as Spark's ``array<double>`` (a variable-size Arrow list)."""
    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


def _matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _solver(
    row: str,
    col: str,
    features,
    offsets,
    mu: float,
    strength: float,
    exponent: float,
    device: str,
    statistics: bool,
) -> Callable[[pa.Table], pa.Table]:
    """The task of one half-step: solve every row of a block against broadcast features."""

    def solve(table: pa.Table) -> pa.Table:
        rows = table.column(row).to_numpy()
        cols = table.column(col).to_numpy()
        ids, local = np.unique(rows, return_inverse=True)
        weights = table.column("weight").to_numpy()
        F, offset = features.value, offsets.value
        targets = table.column("rating").to_numpy() - mu - offset[cols]
        reg = row_regularization(local, weights, ids.size, strength, exponent)
        index = RowIndex.build(local, cols, ids.size)
        A, b, x = half_step(index, targets, weights, F, reg, get_backend(device))
        residual = targets - np.einsum("ij,ij->i", x[local], F[cols])
        columns = {
            "id": pa.array(ids),
            "x": _vectors(x),
            "sse": pa.array(np.bincount(local, weights * residual**2, minlength=ids.size)),
            "sq": pa.array(np.bincount(local, residual**2, minlength=ids.size)),
        }
        if statistics:
            upper = np.triu_indices(x.shape[1])
            columns["gram"] = _vectors(A[:, upper[0], upper[1]])
            columns["rhs"] = _vectors(b)
        return pa.table(columns)

    return solve


def _schema(d: int, statistics: bool) -> str:
    fields = "id long, x array<double>, sse double, sq double"
    return fields + (", gram array<double>, rhs array<double>" if statistics else "")


def train_distributed(
    spark,
    ratings,
    n_users: int,
    n_items: int,
    params: ALSParams,
    *,
    blocks: int,
    device: str = "cpu",
    init: np.ndarray | None = None,
    progress: Progress | None = None,
) -> tuple[ALSResult, float]:
    """Train on ``ratings`` (uidx, iidx, rating, weight); returns the result and the global mean.

    User and item ids are attached by the caller (``ALSResult`` carries
    ``user_ids``/``item_ids`` set to the dense indices here).
    """
    from pyspark.sql import functions as F

    sc = spark.sparkContext
    frame = ratings.withColumn("ublock", F.col("uidx") % blocks).withColumn(
        "iblock", F.col("iidx") % blocks
    )
    frame = frame.repartition(blocks, "ublock").cache()
    totals = frame.agg(F.sum(F.col("weight") * F.col("rating")), F.sum("weight"), F.count("*"))
    weighted, weight, count = totals.first()
    mu = weighted / weight
    user_weight, user_count = _per_row(frame, "uidx", n_users)
    item_weight, _ = _per_row(frame, "iidx", n_items)
    exponent = params.regularization_exponent
    reg_u = params.user_regularization * np.maximum(user_weight, 1.0) ** exponent
    reg_i = params.item_regularization * np.maximum(item_weight, 1.0) ** exponent
    rank, d = params.rank, params.rank + 1
    factors = initial_factors(n_items, rank, params.seed) if init is None else np.asarray(init)
    item_bias = np.zeros(n_items)
    user_reg = (params.user_regularization, params.regularization_exponent)
    item_reg = (params.item_regularization, params.regularization_exponent)

    def step(side: str, features: np.ndarray, offsets: np.ndarray, stats: bool):
        row, col, block, (strength, exponent) = (
            ("uidx", "iidx", "ublock", user_reg)
            if side == "users"
            else ("iidx", "uidx", "iblock", item_reg)
        )
        shared_f, shared_o = sc.broadcast(features), sc.broadcast(offsets)
        solve = _solver(row, col, shared_f, shared_o, mu, strength, exponent, device, stats)
        try:
            out = frame.groupBy(block).applyInArrow(solve, _schema(d, stats)).toArrow()
        finally:
            shared_f.unpersist()
            shared_o.unpersist()
        order = np.argsort(out.column("id").to_numpy())
        return out.take(pa.array(order))

    for iteration in range(params.iterations + 1):
        started = time.perf_counter()
        item_features = np.hstack([factors, np.ones((n_items, 1))])
        final = iteration == params.iterations
        users = step("users", item_features, item_bias, final)
        w = _matrix(users.column("x"), d)
        rmse = float(np.sqrt(users.column("sq").to_numpy().sum() / count))
        if final:
            break
        fit = float(users.column("sse").to_numpy().sum())
        loss = objective(fit, w, reg_u, np.column_stack([factors, item_bias]), reg_i)
        user_features = np.hstack([w[:, :rank], np.ones((n_users, 1))])
        items = step("items", user_features, w[:, rank], False)
        solved = _matrix(items.column("x"), d)
        factors, item_bias = solved[:, :rank], solved[:, rank]
        seconds = time.perf_counter() - started
        log.info("ALS iteration %d: train RMSE %.4f (%.2fs)", iteration + 1, rmse, seconds)
        if progress is not None:
            progress(iteration + 1, rmse, loss, seconds)
    upper = np.triu_indices(d)
    gram = np.empty((n_users, d, d))
    gram[:, upper[0], upper[1]] = _matrix(users.column("gram"), upper[0].size)
    gram[:, upper[1], upper[0]] = gram[:, upper[0], upper[1]]
    frame.unpersist()
    result = ALSResult(
        user_ids=np.arange(n_users),
        item_ids=np.arange(n_items),
        global_mean=mu,
        item_factors=factors,
        item_bias=item_bias,
        user_weights=w,
        user_gram=gram,
        user_rhs=_matrix(users.column("rhs"), d),
        user_count=user_count,
        train_rmse=rmse,
    )
    return result, mu


def _per_row(frame, column: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted and plain rating counts per dense index of ``column``."""
    from pyspark.sql import functions as F

    table = frame.groupBy(column).agg(F.sum("weight").alias("w"), F.count("*").alias("n"))
    table = table.toArrow()
    index = table.column(column).to_numpy()
    weighted, plain = np.zeros(n), np.zeros(n, dtype=np.int64)
    weighted[index] = table.column("w").to_numpy()
    plain[index] = table.column("n").to_numpy()
    return weighted, plain
